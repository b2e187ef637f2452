"""The gateway over real in-process channels: real template and cache services,
in-process fakes for the tokenizer and inference (unit scope: no model)."""
from __future__ import annotations

import uuid

import grpc
import pytest
import redis
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2
from redis import asyncio as aioredis

from meshkit.errors import InvalidArgument
from tests.polling import until
from tests.servicer.fakes import PublishingTemplate
from tests.servicer.gateway_mesh import run_mesh


def finance(cache_mode=gateway_pb2.CACHE_MODE_USE, **sampling) -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": "What is a bond?"})
    return gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
                                       sampling=gateway_pb2.SamplingParams(**sampling), cache_mode=cache_mode)


def bad_request_fields(error) -> list[str]:
    status = rpc_status.from_call(error)
    bad = error_details_pb2.BadRequest()
    assert status.details and status.details[0].Unpack(bad)
    return [v.field for v in bad.field_violations]


def test_a_miss_makes_every_hop_and_a_hit_makes_only_the_cache_hop(inprocess_server, redis_server):
    prefix = f"test:gw-{uuid.uuid4().hex}"

    async def scenario(stub, tokenizer, inference):
        first = await stub.Generate(finance(max_new_tokens=3), timeout=10)
        await stored(redis_server, prefix)  # the store runs after the answer was sent
        calls_before = (inference.calls, tokenizer.calls)
        second = await stub.Generate(finance(max_new_tokens=3), timeout=10)
        return first, second, calls_before, (inference.calls, tokenizer.calls)

    first, second, calls_before, calls_after = run_mesh(inprocess_server, redis_server, scenario, key_prefix=prefix)
    assert first.text == "Hello 世界" and not first.cache_hit
    assert [t.hop for t in first.timings] == ["cache", "template", "tokenizer", "inference.ttft", "inference", "total"]
    assert second.cache_hit and second.text == first.text
    assert second.usage == first.usage and second.finish_reason == first.finish_reason
    assert first.usage.completion_tokens == 3 and first.finish_reason == gateway_pb2.FINISH_REASON_LENGTH
    assert [t.hop for t in second.timings] == ["cache", "total"]
    assert calls_before == calls_after == (1, 1)
    assert len(second.trace_id) == 32


def test_sampled_requests_without_a_seed_are_never_cached(inprocess_server, redis_server):
    prefix = f"test:gw-{uuid.uuid4().hex}"

    async def scenario(stub, tokenizer, inference):
        for _ in range(3):
            reply = await stub.Generate(finance(max_new_tokens=4, temperature=0.8), timeout=10)
            assert not reply.cache_hit
        return inference.calls

    assert run_mesh(inprocess_server, redis_server, scenario, key_prefix=prefix) == 3
    # Read after the mesh closed: the gateway's close waits for its pending stores, so a wrongful one has landed.
    with redis.Redis.from_url(redis_server) as client:
        assert client.keys(f"{prefix}:*") == []


def test_stream_ends_with_a_done_chunk_and_server_timing_trailer(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        call = stub.GenerateStream(finance(max_new_tokens=5), timeout=10, metadata=(("x-request-id", "abc123"),))
        chunks = [chunk async for chunk in call]
        return chunks, await call.initial_metadata(), await call.trailing_metadata()

    chunks, initial, trailing = run_mesh(inprocess_server, redis_server, scenario)
    assert [c.delta for c in chunks[:-1]] == ["Hel", "lo", " 世界"]
    assert chunks[-1].done and chunks[-1].usage.completion_tokens == 3
    assert dict(initial)["x-request-id"] == "abc123"
    assert "template;dur=" in dict(trailing)["server-timing"]


def test_a_missing_required_variable_passes_through_with_its_field(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="finance_question")))
        return caught.value

    error = run_mesh(inprocess_server, redis_server, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["template.variables.question"]


def test_no_prompt_is_invalid_argument_on_prompt(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(gateway_pb2.GenerateRequest())
        return caught.value

    error = run_mesh(inprocess_server, redis_server, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["prompt"]


@pytest.mark.parametrize("sampling, field", [
    ({"temperature": 1e9}, "sampling.temperature"),
    ({"temperature": float("nan")}, "sampling.temperature"),
    ({"top_p": float("inf")}, "sampling.top_p"),
    ({"top_k": 10 ** 6}, "sampling.top_k"),
    ({"max_new_tokens": 10 ** 6}, "sampling.max_new_tokens"),
    ({"stop": ["x" * 65]}, "sampling.stop"),
])
def test_sampling_out_of_its_range_is_refused_at_the_gateway(inprocess_server, redis_server, sampling, field):
    async def scenario(stub, tokenizer, inference):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(finance(**sampling))
        return caught.value, tokenizer.calls + inference.calls

    error, calls = run_mesh(inprocess_server, redis_server, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == [field] and calls == 0


def test_an_unknown_model_is_not_found(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        request = finance()
        request.model = "gpt-9"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request)
        return caught.value, inference.calls

    error, calls = run_mesh(inprocess_server, redis_server, scenario)
    assert error.code() == grpc.StatusCode.NOT_FOUND and calls == 0


def test_a_downstream_field_error_keeps_its_details(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        inference.fail_with = InvalidArgument.for_field("sampling.top_k", "too large")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(finance(top_k=5, cache_mode=gateway_pb2.CACHE_MODE_BYPASS))
        return caught.value

    error = run_mesh(inprocess_server, redis_server, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["sampling.top_k"]


def test_a_downstream_bug_is_internal_without_its_message(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        inference.fail_with = RuntimeError("secret path /etc/key leaked")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(finance(cache_mode=gateway_pb2.CACHE_MODE_BYPASS))
        return caught.value

    error = run_mesh(inprocess_server, redis_server, scenario)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "/etc/key" not in error.details()


def test_count_tokens_renders_then_counts(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        request = gateway_pb2.CountTokensRequest(chat=gateway_pb2.Chat(
            messages=[gateway_pb2.ChatMessage(role="user", content="abcd")]))
        return await stub.CountTokens(request), inference.calls

    reply, calls = run_mesh(inprocess_server, redis_server, scenario)
    assert reply.prompt_tokens == 4 and reply.model == "smollm2" and calls == 0


def test_a_version_published_while_the_catalog_is_stale_keeps_the_stored_key_the_looked_up_key(
        inprocess_server, redis_server):
    template = PublishingTemplate("finance_question", ["1.0.0"])
    prefix = f"test:stale-{uuid.uuid4().hex}"

    async def scenario(stub, tokenizer, inference):
        template.publish("1.1.0")  # the gateway's view still says 1.0.0 is the newest
        miss = await stub.Generate(finance(max_new_tokens=3), timeout=10)
        entries = await stored(redis_server, prefix)
        hit = await stub.Generate(finance(max_new_tokens=3), timeout=10)
        return miss, hit, entries, inference.calls

    miss, hit, entries, inference_calls = run_mesh(inprocess_server, redis_server, scenario, key_prefix=prefix,
                                                  template=template, catalog_refresh_s=3600)
    assert not miss.cache_hit and hit.cache_hit and hit.text == miss.text
    assert inference_calls == 1
    assert len(entries) == 1
    # The miss rendered the version its key names, not the one published after the view was taken.
    assert template.rendered == ["1.0.0"]


async def stored(redis_url: str, prefix: str) -> list[bytes]:
    """The answer entries under ``prefix`` once there is one (answers are stored off the caller's path)."""
    redis = aioredis.from_url(redis_url)
    try:
        return await until(lambda: redis.keys(f"{prefix}:*:e:*"), what=f"an answer stored under {prefix}")
    finally:
        await redis.aclose()


def test_the_callers_request_id_goes_to_every_hop_and_back_on_every_rpc(inprocess_server, redis_server):
    template = PublishingTemplate("finance_question", ["1.0.0"])
    sent = (("x-request-id", "req-42"),)

    async def scenario(stub, tokenizer, inference):
        call = stub.Generate(finance(max_new_tokens=3), timeout=10, metadata=sent)
        await call
        echoed = [dict(await call.initial_metadata())["x-request-id"]]
        count = stub.CountTokens(gateway_pb2.CountTokensRequest(template=finance().template), timeout=10,
                                 metadata=(("x-request-id", "req-43"),))
        await count
        echoed.append(dict(await count.initial_metadata())["x-request-id"])
        listing = stub.ListTemplates(gateway_pb2.ListTemplatesRequest(), timeout=10, metadata=(("x-request-id", "req-44"),))
        await listing
        echoed.append(dict(await listing.initial_metadata())["x-request-id"])
        return echoed, tokenizer.request_ids, inference.request_ids

    echoed, at_tokenizer, at_inference = run_mesh(inprocess_server, redis_server, scenario, template=template)
    assert echoed == ["req-42", "req-43", "req-44"]
    assert template.request_ids == ["req-42", "req-43"]
    assert at_tokenizer == ["req-42", "req-43"] and at_inference == ["req-42"]


def test_a_caller_without_a_request_id_gets_one_that_every_hop_sees(inprocess_server, redis_server):
    template = PublishingTemplate("finance_question", ["1.0.0"])

    async def scenario(stub, tokenizer, inference):
        call = stub.Generate(finance(max_new_tokens=3, temperature=0.5), timeout=10)
        await call
        return dict(await call.initial_metadata())["x-request-id"], tokenizer.request_ids, inference.request_ids

    made, at_tokenizer, at_inference = run_mesh(inprocess_server, redis_server, scenario, template=template)
    assert len(made) == 32 and template.request_ids == at_tokenizer == at_inference == [made]
