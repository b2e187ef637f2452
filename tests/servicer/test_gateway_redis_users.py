"""The gateway and the cache service over real channels, each on Redis as its own ACL user
(deploy/redis/users.acl): a miss is stored by the cache service, the hit is read by the gateway."""
from __future__ import annotations

from nlpmesh.gateway.v1 import gateway_pb2

from tests.servicer.gateway_mesh import run_mesh
from tests.servicer.test_gateway_servicer import finance, stored


def test_a_miss_is_stored_and_then_hit_with_each_service_on_its_own_redis_user(inprocess_server, acl_redis):
    async def scenario(stub, tokenizer, inference):
        first = await stub.Generate(finance(max_new_tokens=3), timeout=10)
        await stored(acl_redis.url("admin"), "nlpmesh:pc")
        second = await stub.Generate(finance(max_new_tokens=3), timeout=10)  # Redis: the near tier was empty
        third = await stub.Generate(finance(max_new_tokens=3), timeout=10)  # the near tier
        refresh = await stub.Generate(finance(gateway_pb2.CACHE_MODE_REFRESH, max_new_tokens=3), timeout=10)
        return first, second, third, refresh, inference.calls

    first, second, third, refresh, calls = run_mesh(
        inprocess_server, acl_redis.url("gateway"), scenario, key_prefix="nlpmesh:pc",
        cache_redis_url=acl_redis.url("cache"))
    assert not first.cache_hit and second.cache_hit and third.cache_hit and not refresh.cache_hit
    assert second.text == third.text == first.text
    assert calls == 2
    assert acl_redis.refused() == []  # nothing either service sent was refused
    with acl_redis.client("admin") as admin:
        assert int(admin.hget("nlpmesh:pc:stats", "hits")) == 2  # the near tier's, added at the gateway's close
