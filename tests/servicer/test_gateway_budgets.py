"""Budgets enforced by the gateway, over real in-process channels to fake services."""
from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.__main__ import build_spec as gateway_spec
from gateway.settings import GatewaySettings
from tests.polling import until
from tests.servicer.fakes import FakeInference, FakeTemplate, FakeTokenizer, fake_spec

POLICY = """
default_total_ms = 5000
[hops]
cache = 20
template = 100
tokenizer = 100
"inference.ttft" = 80
inference = 3000
"""
# For tests of the inference hops only: the first call's template and tokenizer hops include
# connecting to their fakes, which on a loaded machine can pass 100 ms.
ROOMY_HEAD = POLICY.replace("template = 100", "template = 1000").replace("tokenizer = 100", "tokenizer = 1000")


def request(budget_ms: int = 0, cache_mode=gateway_pb2.CACHE_MODE_BYPASS) -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": "What is a bond?"})
    return gateway_pb2.GenerateRequest(
        template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=3), cache_mode=cache_mode, budget_ms=budget_ms)


def run(inprocess_server, tmp_path, scenario, template=None, inference=None, redis_url="", policy_text=POLICY):
    template = template or FakeTemplate()
    tokenizer = FakeTokenizer()
    inference = inference or FakeInference()
    policy = tmp_path / "budgets.toml"
    policy.write_text(policy_text)

    async def main():
        async with (
            inprocess_server(fake_spec("tpl", template), GatewaySettings()) as tpl,
            inprocess_server(fake_spec("tok", tokenizer), GatewaySettings()) as tok,
            inprocess_server(fake_spec("inf", inference), GatewaySettings()) as inf,
        ):
            settings = GatewaySettings(
                template_addr=tpl.address, tokenizer_addr=tok.address, inference_addr=inf.address,
                cache_addr="127.0.0.1:1", redis_url=redis_url, budgets_file=policy, near_cache_bytes=0,
                cache_lookup_timeout_s=5.0, auth="off",
            )
            async with inprocess_server(gateway_spec(settings), settings) as gateway:
                return await scenario(gateway_pb2_grpc.GatewayStub(gateway.channel), template, tokenizer, inference)

    return asyncio.run(main())


def error_hop(error: grpc.aio.AioRpcError) -> str:
    info = error_details_pb2.ErrorInfo()
    [detail] = rpc_status.from_call(error).details
    assert detail.Unpack(info)
    return info.metadata["hop"]


def test_a_request_without_a_deadline_gets_finite_deadlines_on_every_hop(inprocess_server, tmp_path):
    async def scenario(stub, template, tokenizer, inference):
        await stub.Generate(request())  # no timeout= : the caller set no deadline
        return template.deadlines + tokenizer.deadlines + inference.deadlines

    deadlines = run(inprocess_server, tmp_path, scenario)
    assert len(deadlines) == 3
    assert all(d is not None for d in deadlines), deadlines
    assert deadlines[0] <= 0.11 and deadlines[1] <= 0.11  # template and tokenizer: their 100 ms budgets
    assert 0.5 < deadlines[2] <= 3.05  # inference: its own budget


def test_the_callers_shorter_deadline_wins(inprocess_server, tmp_path):
    async def scenario(stub, template, tokenizer, inference):
        await stub.Generate(request(), timeout=0.5)
        return inference.deadlines[0]

    assert run(inprocess_server, tmp_path, scenario) <= 0.5


def test_every_timing_carries_its_budget(inprocess_server, tmp_path):
    async def scenario(stub, template, tokenizer, inference):
        call = stub.Generate(request(budget_ms=2000))
        return await call, await call.trailing_metadata()

    reply, trailing = run(inprocess_server, tmp_path, scenario)
    budgets = {t.hop: t.budget_ms for t in reply.timings}
    assert budgets == {"template": 100, "tokenizer": 100, "inference.ttft": 80, "inference": 3000, "total": 2000}
    assert not any(t.over_budget for t in reply.timings)
    assert 'template;dur=' in dict(trailing)["server-timing"] and 'desc="budget 100"' in dict(trailing)["server-timing"]


def test_a_slow_first_token_is_marked_over_budget_and_the_answer_still_arrives(inprocess_server, tmp_path):
    async def scenario(stub, template, tokenizer, inference):
        return await stub.Generate(request())

    reply = run(inprocess_server, tmp_path, scenario, inference=FakeInference(first_token_delay_s=0.15),
                policy_text=ROOMY_HEAD)
    timings = {t.hop: t for t in reply.timings}
    assert reply.text == "Hello 世界"
    assert timings["inference.ttft"].over_budget and timings["inference.ttft"].elapsed_ms >= 150
    assert not timings["template"].over_budget


def test_a_hop_slower_than_its_budget_fails_naming_it_and_inference_never_runs(inprocess_server, tmp_path):
    async def scenario(stub, template, tokenizer, inference):
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request())
        return caught.value, time.perf_counter() - started, inference.calls

    error, elapsed, inference_calls = run(inprocess_server, tmp_path, scenario, template=FakeTemplate(delay_s=0.5))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error_hop(error) == "template"
    assert elapsed < 0.4  # cut at the template's 100 ms budget, not after its 500 ms
    assert inference_calls == 0


def test_a_cache_lookup_over_its_budget_is_a_miss_not_a_failure(inprocess_server, tmp_path):
    with socket.socket() as black_hole:  # accepts connections, never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        url = f"redis://127.0.0.1:{black_hole.getsockname()[1]}/0"

        async def scenario(stub, template, tokenizer, inference):
            return await stub.Generate(request(cache_mode=gateway_pb2.CACHE_MODE_USE))

        reply = run(inprocess_server, tmp_path, scenario, redis_url=url)
    timings = {t.hop: t for t in reply.timings}
    assert reply.text == "Hello 世界" and not reply.cache_hit
    assert timings["cache"].budget_ms == 20 and 20 <= timings["cache"].elapsed_ms < 200


def test_cancelling_a_stream_frees_the_engines_sequence(inprocess_server, tmp_path):
    from services.inference.servicer import build_spec as inference_spec
    from services.inference.settings import InferenceSettings
    from tests.tiny_llama import tiny_engine

    engine = tiny_engine()
    policy = tmp_path / "budgets.toml"
    policy.write_text(POLICY)

    async def main():
        settings = InferenceSettings()
        async with (
            inprocess_server(fake_spec("tpl", FakeTemplate()), GatewaySettings()) as tpl,
            inprocess_server(fake_spec("tok", FakeTokenizer()), GatewaySettings()) as tok,
            inprocess_server(inference_spec(settings, engine_factory=lambda _: engine), settings) as inf,
        ):
            gateway_settings = GatewaySettings(
                template_addr=tpl.address, tokenizer_addr=tok.address, inference_addr=inf.address,
                cache_addr="127.0.0.1:1", redis_url="", budgets_file=policy, auth="off")
            async with inprocess_server(gateway_spec(gateway_settings), gateway_settings) as gateway:
                stub = gateway_pb2_grpc.GatewayStub(gateway.channel)
                long = request()
                long.sampling.max_new_tokens = 2000
                call = stub.GenerateStream(long)
                chunks = 0
                async for _ in call:
                    chunks += 1
                    if chunks == 2:
                        break
                busy = engine.active_count
                call.cancel()
                await until(lambda: engine.active_count == 0, timeout_s=1.0,
                            what="the engine to drop the cancelled sequence")
                return busy, engine.active_count

    try:
        busy, after = asyncio.run(main())
    finally:
        engine.close()
    assert busy == 1 and after == 0


def test_slow_first_tokens_in_the_past_do_not_refuse_a_short_budget_now(inprocess_server, tmp_path):
    # After a burst the engine is fast again: a short budget is sent to inference, whose engine judges its
    # own queue, not refused at the gateway by the median of first tokens the burst left behind.
    async def scenario(stub, template, tokenizer, inference):
        for _ in range(6):
            await stub.Generate(request(budget_ms=4000))
        inference.first_token_delay_s = 0.0
        calls = inference.calls
        reply = await stub.Generate(request(budget_ms=250))
        return reply, inference.calls - calls

    reply, calls = run(inprocess_server, tmp_path, scenario, inference=FakeInference(first_token_delay_s=0.3),
                       policy_text=ROOMY_HEAD)
    assert reply.text == "Hello 世界" and calls == 1
