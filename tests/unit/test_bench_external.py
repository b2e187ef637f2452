"""The external-engine bench's yardstick gateway (bench/bare_gateway.py) and the lines it prints.

The bare gateway is the bench's floor: the same two hops as the gateway and nothing else. Here it runs
against in-process stand-ins of the tokenizer and an inference service, so what it sends on is checked."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from nlpmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from bench import external_engine
from bench.bare_gateway import BareGateway


class _Tokenizer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self):
        self.requests = []

    async def EncodeChat(self, request, context):
        self.requests.append(request)
        return tokenizer_pb2.EncodeResponse(token_ids=[len(m.content) for m in request.messages], model=request.model)


class _Inference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self):
        self.requests = []

    async def Generate(self, request, context):
        self.requests.append(request)
        for word in ("a", "b"):
            yield inference_pb2.GenerateChunk(delta=word)
        yield inference_pb2.GenerateChunk(done=True, finish_reason=inference_pb2.FINISH_REASON_LENGTH,
                                          prompt_tokens=len(request.prompt_token_ids), completion_tokens=2)


async def _server(*register) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    for add, servicer in register:
        add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_the_bare_gateway_makes_the_two_hops_and_passes_the_stream_on():
    asyncio.run(_two_hops())


async def _two_hops():
    tokenizer, inference = _Tokenizer(), _Inference()
    servers = [await _server((tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, tokenizer)),
               await _server((inference_pb2_grpc.add_InferenceServiceServicer_to_server, inference))]
    gateway, address = await _server(
        (gateway_pb2_grpc.add_GatewayServicer_to_server, BareGateway(servers[0][1], {"m1": servers[1][1]})))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.GenerateRequest(
                chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content="four")]),
                model="m1", sampling=gateway_pb2.SamplingParams(max_new_tokens=2))
            chunks = [chunk async for chunk in stub.GenerateStream(request)]
            assert [c.delta for c in chunks if c.delta] == ["a", "b"]
            assert chunks[-1].done and chunks[-1].usage.completion_tokens == 2
            # The tokenizer's ids, and the request's model and max_new_tokens, reach the inference service.
            assert tokenizer.requests[0].model == "m1"
            assert list(inference.requests[0].prompt_token_ids) == [4]
            assert (inference.requests[0].model, inference.requests[0].sampling.max_new_tokens) == ("m1", 2)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                request.model = "other"
                [chunk async for chunk in stub.GenerateStream(request)]
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        for server in (gateway, *(s for s, _ in servers)):
            await server.stop(None)


def _alone(gateway: float, adapter: float, direct: float, bare: float | None) -> dict:
    paths = {"gateway": gateway, "adapter": adapter, "direct_http": direct, **({"bare_gateway": bare} if bare else {})}
    alone: dict = {name: {"n": 400, "p50_ms": ms, "p99_ms": ms * 2, "mean_ms": ms} for name, ms in paths.items()}
    for name in paths.keys() - {"direct_http"}:
        alone[f"{name}_added_p50_ms"] = alone[f"{name}_added_paired_p50_ms"] = paths[name] - direct
    return {**alone, "calls": 400}


def _result(bare: float | None) -> dict:
    row = {name: {"ttft": {"p50_ms": 100.0}, "decode_tok_s": {"p50": 70.0}} for name in ("gateway", "adapter",
                                                                                        "direct_http")}
    row.update(ttft_added_p50_ms=5.0, decode_ratio_p50=0.95, adapter_ttft_added_p50_ms=1.0,
               adapter_decode_ratio_p50=0.99)
    return {"max_new_tokens": 128, "engine": "llama.cpp", "1_streams": row, "8_streams": row,
            "ttft_alone": _alone(104.0, 101.0, 100.0, 102.5 if bare else None),
            "ttft_alone_instant_engine": _alone(4.5, 1.6, 1.0, bare),
            "cache_hit": {"llamacpp": {"p50_ms": 0.9}, "smollm2": {"p50_ms": 0.9}, "ratio_external_to_builtin_p50": 1.0}}


def test_the_lines_set_the_bare_gateway_beside_the_gateway():
    printed = "\n".join(external_engine.lines(_result(3.2)))
    assert "a gateway of the two hops alone (bench/bare_gateway.py) adds 2.2 ms (2.2 ms): the gateway's own " \
           "work is 1.3 ms of what it adds" in printed


def test_a_run_kept_from_before_the_bare_gateway_still_prints():
    printed = external_engine.lines(_result(None))
    assert not any("bare_gateway" in line for line in printed)
    assert any("the gateway adds 3.5 ms" in line for line in printed)
