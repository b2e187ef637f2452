"""The cache service over a real in-process grpc.aio server and channel."""
import asyncio
import logging
import socket
import uuid

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.cache.v1 import cache_pb2, cache_pb2_grpc

from meshkit.server import create_server
from services.cache.servicer import build_spec
from services.cache.settings import CacheSettings


def settings_for(redis_url: str) -> CacheSettings:
    return CacheSettings(port=0, redis_url=redis_url, key_prefix=f"test:{uuid.uuid4().hex}")


def run_with_stub(settings: CacheSettings, body):
    async def main():
        spec = build_spec(settings)
        server, port, _ = await create_server(spec, settings)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await body(cache_pb2_grpc.CacheServiceStub(channel))
        finally:
            await server.stop(None)
            await spec.close()

    return asyncio.run(main())


def template_key(tenant="acme", temperature=0.0, **variables) -> cache_pb2.PromptCacheKey:
    struct = struct_pb2.Struct()
    struct.update(variables or {"country": "France"})
    return cache_pb2.PromptCacheKey(
        tenant=tenant,
        model="m1",
        revision="r1",
        template=cache_pb2.TemplatePrompt(id="capital", version="1", variables=struct),
        sampling=cache_pb2.Sampling(max_new_tokens=16, temperature=temperature, top_p=0.9),
    )


ANSWER = cache_pb2.CachedAnswer(
    text="Paris.", finish_reason=1, prompt_tokens=9, completion_tokens=2, model="m1"
)


def test_store_lookup_invalidate_and_stats_round_trip(redis_server):
    async def body(stub):
        miss = await stub.Lookup(cache_pb2.LookupRequest(key=template_key()))
        assert not miss.hit
        stored = await stub.Store(cache_pb2.StoreRequest(key=template_key(), answer=ANSWER, ttl_s=30))
        assert stored.stored
        hit = await stub.Lookup(cache_pb2.LookupRequest(key=template_key()))
        assert hit.hit and hit.answer == ANSWER
        other_tenant = await stub.Lookup(cache_pb2.LookupRequest(key=template_key(tenant="globex")))
        assert not other_tenant.hit
        stats = await stub.Stats(cache_pb2.StatsRequest())
        assert (stats.hits, stats.misses, stats.stores) == (1, 2, 1)
        removed = await stub.Invalidate(cache_pb2.InvalidateRequest(template_id="capital", tenant="acme"))
        assert removed.removed == 1
        after = await stub.Lookup(cache_pb2.LookupRequest(key=template_key()))
        assert not after.hit

    run_with_stub(settings_for(redis_server), body)


def test_chat_key_and_model_invalidation(redis_server):
    chat = cache_pb2.PromptCacheKey(
        tenant="acme", model="m1", revision="r1",
        chat=cache_pb2.ChatList(messages=[cache_pb2.ChatMessage(role="user", content="hi")]),
        sampling=cache_pb2.Sampling(temperature=0.7, seed=5),
    )

    async def body(stub):
        assert (await stub.Store(cache_pb2.StoreRequest(key=chat, answer=ANSWER))).stored
        assert (await stub.Lookup(cache_pb2.LookupRequest(key=chat))).hit
        removed = await stub.Invalidate(cache_pb2.InvalidateRequest(model="m1"))
        assert removed.removed == 1
        assert not (await stub.Lookup(cache_pb2.LookupRequest(key=chat))).hit

    run_with_stub(settings_for(redis_server), body)


def test_sampled_requests_are_not_stored(redis_server):
    async def body(stub):
        response = await stub.Store(cache_pb2.StoreRequest(key=template_key(temperature=0.8), answer=ANSWER))
        assert not response.stored

    run_with_stub(settings_for(redis_server), body)


def _violations(error: grpc.RpcError) -> set[str]:
    status = rpc_status.from_call(error)
    fields = set()
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields |= {v.field for v in bad.field_violations}
    return fields


@pytest.mark.parametrize(
    "request_, fields",
    [
        (cache_pb2.LookupRequest(key=cache_pb2.PromptCacheKey(revision="r1")), {"key.model", "key.prompt"}),
        (
            cache_pb2.LookupRequest(
                key=cache_pb2.PromptCacheKey(
                    model="m1", revision="r1", template=cache_pb2.TemplatePrompt(id="t")
                )
            ),
            {"key.template.version"},
        ),
        (
            cache_pb2.LookupRequest(
                key=cache_pb2.PromptCacheKey(model="m1", revision="", chat=cache_pb2.ChatList())
            ),
            {"key.revision", "key.chat.messages"},
        ),
    ],
)
def test_bad_keys_are_invalid_argument_naming_the_fields(redis_server, request_, fields):
    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Lookup(request_)
        return caught.value

    error = run_with_stub(settings_for(redis_server), body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(error) == fields


def test_store_without_answer_and_invalidate_without_scope_are_invalid(redis_server):
    async def body(stub):
        codes = []
        for call in (
            stub.Store(cache_pb2.StoreRequest(key=template_key())),
            stub.Invalidate(cache_pb2.InvalidateRequest(tenant="acme")),
            stub.Invalidate(cache_pb2.InvalidateRequest(template_id="")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            codes.append(caught.value.code())
        return codes

    codes = run_with_stub(settings_for(redis_server), body)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 3


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_down_is_a_miss_and_warm_up_still_succeeds(caplog):
    settings = settings_for(f"redis://:hunter2@127.0.0.1:{_closed_port()}/0")

    async def body(stub):
        lookup = await stub.Lookup(cache_pb2.LookupRequest(key=template_key()))
        store = await stub.Store(cache_pb2.StoreRequest(key=template_key(), answer=ANSWER))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Stats(cache_pb2.StatsRequest())
        return lookup, store, caught.value.code()

    async def warm_up():
        spec = build_spec(settings)
        await spec.warm_up()
        await spec.close()

    with caplog.at_level(logging.WARNING, logger="nlpmesh.cache"):
        asyncio.run(warm_up())
        lookup, store, stats_code = run_with_stub(settings, body)
    assert not lookup.hit and not store.stored
    assert stats_code == grpc.StatusCode.UNAVAILABLE
    assert "unreachable" in caplog.text and "hunter2" not in caplog.text
