"""`nlpmesh ask`: one request to the gateway, streamed, then the per-hop timings."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from google.protobuf import struct_pb2
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from cli.connect import GatewayAccess


@dataclass(frozen=True)
class AskResult:
    text: str
    final: gateway_pb2.GenerateChunk
    request_id: str


def build_request(question: str | None, template: str | None, variables: dict[str, str],
                  max_new_tokens: int, temperature: float, seed: int | None,
                  cache_mode: int, model: str = "") -> gateway_pb2.GenerateRequest:
    """``model``: a catalogue id (or its name); empty = the mesh's default model."""
    sampling = gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    request = gateway_pb2.GenerateRequest(sampling=sampling, cache_mode=cache_mode, model=model)
    if template:
        values = struct_pb2.Struct()
        values.update(variables)
        request.template.CopyFrom(gateway_pb2.TemplateCall(id=template, variables=values))
    else:
        request.chat.messages.add(role="user", content=question or "")
    return request


def ask(access: GatewayAccess, request: gateway_pb2.GenerateRequest, out: TextIO = sys.stdout,
        timeout_s: float = 300.0) -> AskResult:
    with access.channel() as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).GenerateStream(request, timeout=timeout_s)
        parts, final = [], None
        for chunk in call:
            if chunk.delta:
                parts.append(chunk.delta)
                out.write(chunk.delta)
                out.flush()
            if chunk.done:
                final = chunk
        out.write("\n")
        request_id = dict(call.initial_metadata()).get("x-request-id", "")
    return AskResult("".join(parts), final, request_id)


def timing_table(result: AskResult) -> str:
    final = result.final
    lines = [
        f"cache_hit={final.cache_hit}  model={final.model}  finish={gateway_pb2.FinishReason.Name(final.finish_reason)}"
        f"  prompt_tokens={final.usage.prompt_tokens}  completion_tokens={final.usage.completion_tokens}",
        f"trace_id={final.trace_id}  x-request-id={result.request_id}",
        f"{'hop':<16}{'elapsed ms':>12}{'budget ms':>12}  over",
    ]
    for t in final.timings:
        budget = f"{t.budget_ms:.1f}" if t.budget_ms else "-"
        lines.append(f"{t.hop:<16}{t.elapsed_ms:>12.2f}{budget:>12}  {'OVER' if t.over_budget else ''}")
    return "\n".join(lines)
