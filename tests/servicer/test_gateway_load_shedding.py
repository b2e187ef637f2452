"""Admission control over real channels: a burst beyond the inference capacity is refused before any hop."""
from __future__ import annotations

import asyncio
import time

import grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2

from tests.polling import until
from tests.servicer.fakes import FakeInference
from tests.servicer.gateway_mesh import run_mesh

CAPACITY = 2
SLOW_S = 3.0  # how long an admitted generation holds its place


def question(text: str, cache_mode=gateway_pb2.CACHE_MODE_USE) -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": text})
    return gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
                                       cache_mode=cache_mode)


async def timed(call) -> tuple[object, float]:
    begun = time.perf_counter()
    try:
        result = await call
    except grpc.aio.AioRpcError as error:
        result = error
    return result, time.perf_counter() - begun


def retry_delay_ms(error: grpc.aio.AioRpcError) -> int | None:
    for detail in rpc_status.from_call(error).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToMilliseconds()
    return None


def test_a_burst_beyond_capacity_is_refused_before_the_tokenizer_while_a_cache_hit_is_served(
        inprocess_server, redis_server):
    inference = FakeInference(capacity=CAPACITY)

    async def scenario(stub, tokenizer, inference):
        primed = await stub.Generate(question("What is a bond?"))
        assert not primed.cache_hit
        await until(lambda: _is_hit(stub), timeout_s=5, what="the primed answer to be cached")
        hops_before = tokenizer.calls
        inference.first_token_delay_s = SLOW_S
        burst = [asyncio.create_task(timed(stub.Generate(question(f"Question {i}?", gateway_pb2.CACHE_MODE_BYPASS))))
                 for i in range(6)]
        await until(lambda: inference.active == CAPACITY, timeout_s=5, what="the admitted generations to start")
        hit, hit_s = await timed(stub.Generate(question("What is a bond?")))  # at capacity, still served
        outcomes = await asyncio.gather(*burst)
        return outcomes, hit, hit_s, tokenizer.calls - hops_before

    outcomes, hit, hit_s, tokenizer_calls = run_mesh(inprocess_server, redis_server, scenario, inference=inference)
    refused = [(r, s) for r, s in outcomes if isinstance(r, grpc.aio.AioRpcError)]
    answered = [r for r, _ in outcomes if not isinstance(r, grpc.aio.AioRpcError)]
    assert len(answered) == CAPACITY and len(refused) == 6 - CAPACITY
    for error, seconds in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay_ms(error) == 1000
        assert seconds < SLOW_S / 3  # refused at once, not after waiting for a place
    assert tokenizer_calls == CAPACITY  # the refused requests spent no tokenizer hop
    assert hit.cache_hit and hit_s < SLOW_S / 3


def test_with_admission_off_the_burst_goes_through(inprocess_server, redis_server):
    inference = FakeInference(capacity=1, first_token_delay_s=0.3)

    async def scenario(stub, tokenizer, inference):
        return await asyncio.gather(*(stub.Generate(question(f"Q{i}?", gateway_pb2.CACHE_MODE_BYPASS))
                                      for i in range(3)))

    answers = run_mesh(inprocess_server, redis_server, scenario, inference=inference, admission="off")
    assert [a.text for a in answers] == ["Hello 世界"] * 3


async def _is_hit(stub) -> bool:
    return (await stub.Generate(question("What is a bond?"))).cache_hit


def test_a_stream_its_caller_cancels_frees_its_place_for_the_next_request_at_once(inprocess_server, redis_server):
    # The full report the cancelled stream got stays fresh for 30 s: only the cancel can lift it.
    inference = FakeInference(capacity=1, first_token_delay_s=SLOW_S)

    async def scenario(stub, tokenizer, inference):
        stream = stub.GenerateStream(question("Q0?", gateway_pb2.CACHE_MODE_BYPASS))
        await until(lambda: inference.active == 1, timeout_s=5, what="the stream to take the one place")
        stream.cancel()
        await until(lambda: inference.active == 0, timeout_s=5, what="the cancelled stream to leave inference")
        inference.first_token_delay_s = 0.0
        return await timed(stub.Generate(question("Q1?", gateway_pb2.CACHE_MODE_BYPASS)))

    answer, _ = run_mesh(inprocess_server, redis_server, scenario, inference=inference, admission_full_hold_s=30.0)
    assert not isinstance(answer, grpc.aio.AioRpcError), answer
    assert answer.text == "Hello 世界"
