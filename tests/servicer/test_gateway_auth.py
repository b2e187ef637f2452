"""Auth and tenants at the gateway, over real in-process channels (real template and
cache services, fake tokenizer and inference)."""
from __future__ import annotations

import uuid

import grpc
import pytest
import redis
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.api_keys import create_key, revoke_key
from gateway.tenant import KeyScope, Tenant
from promptcache.keys import tenant_namespace
from tests.polling import until
from tests.servicer.gateway_mesh import run_mesh
from tests.servicer.test_gateway_servicer import stored


def finance(question: str = "What is a bond?") -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": question})
    return gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
                                       sampling=gateway_pb2.SamplingParams(max_new_tokens=3))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def auth_mesh(inprocess_server, redis_url, tmp_path, scenario, key_prefix=None, **settings):
    return run_mesh(inprocess_server, redis_url, scenario, key_prefix=key_prefix or f"test:auth:{uuid.uuid4().hex}",
                    pass_channel=True, auth="on", auth_keys_file=tmp_path / "keys.toml", auth_reload_s=0.05,
                    **settings)


def every_rpc(stub, metadata):
    """(name, call) for each Gateway RPC, made with ``metadata``; a bad request among them."""
    count = gateway_pb2.CountTokensRequest(template=finance().template)
    return (
        ("Generate", lambda: stub.Generate(finance(), metadata=metadata, timeout=5)),
        ("GenerateStream", lambda: stub.GenerateStream(finance(), metadata=metadata, timeout=5)),
        ("CountTokens", lambda: stub.CountTokens(count, metadata=metadata, timeout=5)),
        ("ListTemplates", lambda: stub.ListTemplates(gateway_pb2.ListTemplatesRequest(), metadata=metadata,
                                                     timeout=5)),
        # A bad request without a key learns nothing about the request either.
        ("Generate, empty", lambda: stub.Generate(gateway_pb2.GenerateRequest(), metadata=metadata, timeout=5)),
    )


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = call()
        if hasattr(result, "__aiter__"):
            [_ async for _ in result]
        else:
            await result
    return caught.value


async def is_refused(call) -> bool:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def test_no_malformed_unknown_or_revoked_key_is_unauthenticated_before_any_hop(inprocess_server, redis_server,
                                                                                tmp_path):
    keys = tmp_path / "keys.toml"
    revoked_id, revoked = create_key(keys, Tenant("acme"))
    _, valid = create_key(keys, Tenant("acme"))
    wrong_secret = revoked[:-8] + "AAAAAAAA"
    presented = {"missing": (), "not bearer": (("authorization", valid),), "malformed": bearer("nlpm_x_y"),
                 "unknown": bearer(f"nlpm_{'0' * 16}_{'s' * 43}"), "wrong secret": bearer(wrong_secret),
                 "revoked": bearer(revoked)}

    async def scenario(channel, tokenizer, inference):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await stub.Generate(finance(), metadata=bearer(revoked), timeout=10)  # valid until revoked
        revoke_key(keys, revoked_id)
        await until(lambda: is_refused(stub.ListTemplates(gateway_pb2.ListTemplatesRequest(), metadata=bearer(revoked),
                                                          timeout=5)),
                    what="the keys watcher to drop the revoked key")  # ListTemplates reaches no fake hop
        calls = (tokenizer.calls, inference.calls)
        outcomes = {}
        for name, metadata in presented.items():
            for rpc, call in every_rpc(stub, metadata):
                error = await refused(call)
                outcomes[name, rpc] = (error.code(), error.details())
        return calls, (tokenizer.calls, inference.calls), outcomes

    before, after, outcomes = auth_mesh(inprocess_server, redis_server, tmp_path, scenario)
    assert before == after == (1, 1)  # no refused call reached a hop
    assert len(outcomes) == 6 * 5
    for (name, rpc), (code, details) in outcomes.items():
        assert code == grpc.StatusCode.UNAUTHENTICATED, (name, rpc)
        assert valid not in details and revoked.split("_")[-1] not in details and "AAAAAAAA" not in details
    assert "missing" in outcomes["missing", "Generate"][1]
    assert "malformed" in outcomes["malformed", "Generate"][1]
    assert "unknown or revoked" in outcomes["revoked", "Generate"][1]


def test_health_and_reflection_stay_open_without_a_key(inprocess_server, redis_server, tmp_path):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def scenario(channel, tokenizer, inference):
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = [s.name async for reply in reflection for s in reply.list_services_response.service]
        return health.status, services

    status, services = auth_mesh(inprocess_server, redis_server, tmp_path, scenario)
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert "nlpmesh.gateway.v1.Gateway" in services


def test_the_keys_tenant_reaches_every_hop(inprocess_server, redis_server, tmp_path):
    _, key = create_key(tmp_path / "keys.toml", Tenant("acme"))

    async def scenario(channel, tokenizer, inference):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        reply = await stub.Generate(finance(), metadata=bearer(key), timeout=10)
        await stub.CountTokens(gateway_pb2.CountTokensRequest(template=finance().template), metadata=bearer(key),
                               timeout=5)
        return reply, tokenizer.tenants, inference.tenants, inference.request_tenants

    reply, tokenizer_tenants, inference_tenants, request_tenants = auth_mesh(
        inprocess_server, redis_server, tmp_path, scenario)
    assert reply.text == "Hello 世界"
    assert tokenizer_tenants == ["acme", "acme"]
    assert inference_tenants == ["acme"] and request_tenants == ["acme"]


def test_another_tenants_identical_prompt_misses_the_cache(inprocess_server, redis_server, tmp_path):
    keys = tmp_path / "keys.toml"
    _, alice = create_key(keys, Tenant("tenant-a"))
    _, bob = create_key(keys, Tenant("tenant-b"))
    prefix = f"test:auth:{uuid.uuid4().hex}"

    async def scenario(channel, tokenizer, inference):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = await stub.Generate(finance(), metadata=bearer(alice), timeout=10)
        await stored(redis_server, tenant_namespace(prefix, "tenant-a"))
        again = await stub.Generate(finance(), metadata=bearer(alice), timeout=10)
        other = await stub.Generate(finance(), metadata=bearer(bob), timeout=10)
        return first, again, other, inference.request_tenants

    first, again, other, request_tenants = auth_mesh(inprocess_server, redis_server, tmp_path, scenario,
                                                     key_prefix=prefix)
    assert not first.cache_hit and again.cache_hit  # the cache works for one tenant
    assert not other.cache_hit and other.text == first.text
    # B's miss was generated for B: the prefix-KV key on the inference side is salted with it.
    assert request_tenants == ["tenant-a", "tenant-b"]


def test_a_tenant_without_the_prompt_cache_neither_reads_nor_writes_it(inprocess_server, redis_server, tmp_path):
    keys = tmp_path / "keys.toml"
    # Two keys of one tenant: the same cache keys, one of them with the cache turned off.
    _, cached = create_key(keys, Tenant("mixed"))
    _, uncached = create_key(keys, Tenant("mixed", prompt_cache=False))
    _, solo = create_key(keys, Tenant("solo", prompt_cache=False))
    prefix = f"test:auth:{uuid.uuid4().hex}"

    async def scenario(channel, tokenizer, inference):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await stub.Generate(finance(), metadata=bearer(cached), timeout=10)
        await stored(redis_server, tenant_namespace(prefix, "mixed"))
        assert (await stub.Generate(finance(), metadata=bearer(cached), timeout=10)).cache_hit
        without_read = await stub.Generate(finance(), metadata=bearer(uncached), timeout=10)
        solo_replies = [await stub.Generate(finance("Solo?"), metadata=bearer(solo), timeout=10) for _ in range(2)]
        return without_read, solo_replies, inference.calls

    without_read, solo_replies, calls = auth_mesh(inprocess_server, redis_server, tmp_path, scenario, key_prefix=prefix)
    # Read after the mesh closed: the gateway's close waits for its pending stores, so a wrongful one has landed.
    with redis.Redis.from_url(redis_server) as client:
        solo_keys = list(client.scan_iter(f"{tenant_namespace(prefix, 'solo')}:*"))
        mixed_keys = list(client.scan_iter(f"{tenant_namespace(prefix, 'mixed')}:*"))
    assert not without_read.cache_hit  # the entry was there, and was not read
    assert [r.cache_hit for r in solo_replies] == [False, False]
    assert solo_keys == [] and mixed_keys  # nothing written for solo; the check can see keys
    assert calls == 4


def test_auth_off_serves_every_caller_as_the_configured_tenant(inprocess_server, redis_server, tmp_path):
    async def scenario(channel, tokenizer, inference):
        reply = await gateway_pb2_grpc.GatewayStub(channel).Generate(finance(), timeout=10)
        return reply, inference.request_tenants

    reply, tenants = run_mesh(inprocess_server, redis_server, scenario, key_prefix=f"test:auth:{uuid.uuid4().hex}",
                              pass_channel=True, auth="off", tenant="public")
    assert reply.text == "Hello 世界" and tenants == ["public"]


def _key_scope_refusal(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """The code, the ErrorInfo reason and its metadata of a refusal."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    infos = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, infos
    return error.code(), infos[0].reason, dict(infos[0].metadata)


def test_a_key_outside_its_scope_is_permission_denied_before_any_hop_and_lists_only_its_scope(
        inprocess_server, redis_server, tmp_path):
    keys = tmp_path / "keys.toml"
    _, finance_only = create_key(keys, Tenant("desk", scope=KeyScope(templates=frozenset({"finance_question"}))))
    _, other_model = create_key(keys, Tenant("desk", scope=KeyScope(models=frozenset({"gemma3-270m"}))))
    _, this_model = create_key(keys, Tenant("desk", scope=KeyScope(models=frozenset({"smollm2"}))))
    raw = gateway_pb2.GenerateRequest(chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content="Hi")]),
                                      sampling=gateway_pb2.SamplingParams(max_new_tokens=3))
    support = gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="support_answer"))

    async def scenario(channel, tokenizer, inference):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        listings = {}
        for name, key in (("finance_only", finance_only), ("other_model", other_model), ("this_model", this_model)):
            templates = await stub.ListTemplates(gateway_pb2.ListTemplatesRequest(), metadata=bearer(key), timeout=5)
            models = await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=bearer(key), timeout=5)
            listings[name] = ([t.id for t in templates.templates], [m.id for m in models.models])
        allowed = [await stub.Generate(finance(), metadata=bearer(finance_only), timeout=10),
                   await stub.Generate(raw, metadata=bearer(this_model), timeout=10)]
        refusals, reached = {}, {}
        for name, key in (("finance_only", finance_only), ("other_model", other_model)):
            for rpc, call in (*every_rpc(stub, bearer(key))[:4],
                              ("Generate raw", lambda key=key: stub.Generate(raw, metadata=bearer(key), timeout=5)),
                              ("Generate support", lambda key=key: stub.Generate(support, metadata=bearer(key),
                                                                                  timeout=5))):
                calls = (tokenizer.calls, inference.calls)
                try:
                    result = call()
                    if hasattr(result, "__aiter__"):
                        [_ async for _ in result]
                    else:
                        await result
                    refusals[name, rpc] = None
                except grpc.aio.AioRpcError as error:
                    refusals[name, rpc] = _key_scope_refusal(error) if error.code() == \
                        grpc.StatusCode.PERMISSION_DENIED else error.code()
                    reached[name, rpc] = calls != (tokenizer.calls, inference.calls)
        return listings, allowed, reached, refusals

    listings, allowed, reached, refusals = auth_mesh(inprocess_server, redis_server, tmp_path, scenario)
    assert set(listings["finance_only"][0]) == {"finance_question"} and listings["finance_only"][1] == ["smollm2"]
    assert listings["other_model"][1] == [] and "support_answer" in listings["other_model"][0]
    assert listings["this_model"][1] == ["smollm2"]
    assert [reply.text for reply in allowed] == ["Hello 世界"] * 2
    assert len(reached) == 7 and not any(reached.values())  # no refused call reached a hop
    denied = grpc.StatusCode.PERMISSION_DENIED
    # The finance-only key: its template everywhere, a raw prompt or another template nowhere.
    assert refusals["finance_only", "Generate"] is None and refusals["finance_only", "GenerateStream"] is None
    assert refusals["finance_only", "CountTokens"] is None and refusals["finance_only", "ListTemplates"] is None
    assert refusals["finance_only", "Generate raw"] == (denied, "KEY_SCOPE", {"template": ""})
    assert refusals["finance_only", "Generate support"] == (denied, "KEY_SCOPE", {"template": "support_answer"})
    # The other model's key: every generation and count refused for the default model, by name.
    for rpc in ("Generate", "GenerateStream", "CountTokens", "Generate raw", "Generate support"):
        assert refusals["other_model", rpc] == (denied, "KEY_SCOPE", {"model": "smollm2"}), rpc
    assert refusals["other_model", "ListTemplates"] is None
