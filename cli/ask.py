"""`nlpmesh ask`: one request to the gateway through nlpmesh-client, streamed, then the per-hop timings."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from nlpmesh_client import Generation, ResponseFormat, Sampling, Template
from nlpmesh_client.types import Prompt

from cli.connect import GatewayAccess


@dataclass(frozen=True)
class Question:
    """What `ask` sends: the prompt and how to answer it."""
    prompt: Prompt
    model: str = ""  # a catalogue id (or its name); empty = the mesh's default model
    sampling: Sampling = field(default_factory=Sampling)
    cache: str = "use"  # use, bypass or refresh


def build_question(question: str | None, template: str | None, variables: dict[str, str], max_new_tokens: int,
                   temperature: float, seed: int | None, cache: str, model: str = "",
                   response_format: ResponseFormat | None = None) -> Question:
    prompt = Template(template, variables) if template else (question or "")
    return Question(prompt, model, Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                            response_format=response_format), cache)


def response_format_from(json_schema_file: str | None, regex: str | None) -> ResponseFormat | None:
    """``--json-schema FILE`` (the schema's JSON text, checked by the gateway) or ``--regex``; neither: None."""
    if json_schema_file and regex:
        raise ValueError("give --json-schema or --regex, not both")
    if json_schema_file:
        with open(json_schema_file, encoding="utf-8") as schema:
            return ResponseFormat.json_schema(schema.read())
    return ResponseFormat.regex(regex) if regex else None


def ask(access: GatewayAccess, question: Question, out: TextIO = sys.stdout, timeout_s: float = 300.0) -> Generation:
    """Streams the answer to ``out`` as it arrives; returns the whole answer with its timings."""
    with access.client(timeout_s) as client:
        stream = client.stream(question.prompt, model=question.model, sampling=question.sampling,
                               cache=question.cache)
        for delta in stream:
            out.write(delta)
            out.flush()
        out.write("\n")
    return stream.result


def timing_table(result: Generation) -> str:
    lines = [
        f"cache_hit={result.cache_hit}  model={result.model}  finish={result.finish_reason}"
        f"  prompt_tokens={result.usage.prompt_tokens}  completion_tokens={result.usage.completion_tokens}",
        f"trace_id={result.trace_id}  x-request-id={result.request_id}",
        f"{'hop':<16}{'elapsed ms':>12}{'budget ms':>12}  over",
    ]
    for t in result.timings:
        budget = f"{t.budget_ms:.1f}" if t.budget_ms else "-"
        lines.append(f"{t.hop:<16}{t.elapsed_ms:>12.2f}{budget:>12}  {'OVER' if t.over_budget else ''}")
    return "\n".join(lines)
