"""deploy/redis/users.acl against a real redis-server: each service's Redis code works under its
own user, and what a user was not granted is refused (NOPERM).

The services swallow Redis errors (a failed lookup is a miss), so "it works" is
checked twice: the calls give the right answers, and the server's ACL LOG
holds no refusal.
"""
import asyncio
import subprocess
import uuid

import pytest
import redis
import redis.asyncio as aioredis
import torch

from cli.redis_acl import TEMPLATE
from gateway.quotas import Quotas, QuotaSettings
from gateway.tenant import Tenant, TenantLimits
from meshkit.errors import ResourceExhausted, Unavailable
from meshkit.sampling import Sampling
from promptcache.keys import PromptCacheKey, TemplatePrompt
from promptcache.near_tier import NearCache
from promptcache.redis_tier import _LOOKUP_LUA, CachedAnswer, PromptCache, redis_client
from services.inference.prefix import RedisBlocks
from tests.conftest import REDIS_SERVER, free_port
from tests.polling import until

PREFIX = "nlpmesh:pc"  # the prefixes the ACL names: the services' defaults
ANSWER = CachedAnswer(text="Paris.", finish_reason=1, prompt_tokens=12, completion_tokens=2, model="m1")
REFUSED = r"no permissions|user executing the script can't"  # NOPERM, to a client or inside a script
# A script touching quota-like keys, to show the gateway user's limits.
QUOTA_LUA = """
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return used
"""


def key(tenant: str, template: str = "capital") -> PromptCacheKey:
    return PromptCacheKey(tenant, "m1", "r1", TemplatePrompt(template, "1", {"country": "France"}),
                          Sampling(max_new_tokens=8))


def prompt_cache(url: str) -> PromptCache:
    return PromptCache(redis_client(url), prefix=PREFIX, ttl_s=60, timeout_s=1.0)


def test_the_gateway_and_cache_users_run_the_prompt_cache_as_the_services_split_it(acl_redis):
    tenant = uuid.uuid4().hex
    admin = aioredis.Redis.from_url(acl_redis.url("admin"))

    async def main():
        cache = prompt_cache(acl_redis.url("cache"))  # the cache service: stores, lookups, invalidation, stats
        gateway = NearCache(prompt_cache(acl_redis.url("gateway")), 1 << 20, 60, flush_every_s=0.05)
        await gateway.warm_up()
        gateway.start()
        before = await cache.stats()
        assert await cache.ping()
        assert await cache.store(key(tenant), ANSWER)
        assert await gateway.lookup(key(tenant)) == ANSWER  # Redis, through the lookup script
        assert await gateway.lookup(key(tenant)) == ANSWER  # the near tier; its hit flushed to the stats
        assert await cache.lookup(key(tenant)) == ANSWER  # the cache service's own Lookup
        assert await gateway.lookup(key(tenant, "other")) is None  # a miss, counted by the script
        await admin.script_flush()  # a Redis restart forgets scripts: the gateway loads it again
        assert await gateway.lookup(key(tenant, "other")) is None

        async def counted():
            stats = await cache.stats()
            return (stats.hits - before.hits, stats.misses - before.misses) == (3, 2)
        assert await until(counted)

        async def subscribed():
            return (await admin.pubsub_numsub(f"{PREFIX}:invalidations"))[0][1] >= 1
        assert await until(subscribed)
        assert await cache.invalidate_template("capital", tenant) == 1
        assert await until(lambda: len(gateway) == 0)  # the announcement reached it
        assert await gateway.lookup(key(tenant)) is None
        assert await cache.invalidate_model("m1") == 0  # every tenant: the tenants index, no announcement lost
        await gateway.close()
        await cache.close()
        await admin.aclose()

    asyncio.run(main())
    assert acl_redis.refused() == []


def test_a_corrupt_entry_is_recounted_as_a_miss_under_the_gateway_user(acl_redis):
    tenant = uuid.uuid4().hex
    with acl_redis.client("admin") as admin:
        admin.set(key(tenant).redis_key(PREFIX), b"not json")

    async def main():
        gateway = prompt_cache(acl_redis.url("gateway"))
        assert await gateway.lookup(key(tenant)) is None
        await gateway.close()

    asyncio.run(main())
    assert acl_redis.refused() == []


def test_the_gateway_user_reads_answers_but_cannot_write_them_or_announce_invalidations(acl_redis):
    tenant = uuid.uuid4().hex
    entry = key(tenant).redis_key(PREFIX)

    async def main():
        gateway = prompt_cache(acl_redis.url("gateway"))
        assert not await gateway.store(key(tenant), ANSWER)  # a failed store, never an exception
        with pytest.raises(Unavailable):
            await gateway.invalidate_template("capital", tenant)
        await gateway.close()

    asyncio.run(main())
    refused = {what for user, what in acl_redis.refused() if user == "gateway"}
    # The store's transaction and the invalidation's read; SET and ZADD inside the transaction are
    # refused on the key (the gateway may SET and ZADD quota keys only).
    assert {"multi", "zrange"} <= refused
    with acl_redis.client("gateway") as gateway:
        lookup = gateway.script_load(_LOOKUP_LUA)
        for call in (
            lambda: gateway.set(entry, "{}"),
            lambda: gateway.delete(entry),
            lambda: gateway.hincrby(entry, "hits", 1),  # read-only on answers, even for a write that fits
            lambda: gateway.evalsha(lookup, 2, "elsewhere:e:1", f"{PREFIX}:stats"),  # the script on another key
            lambda: gateway.publish(f"{PREFIX}:invalidations", "1"),
            lambda: gateway.get("nlpmesh:kv:anything"),
            lambda: gateway.flushall(),
            lambda: gateway.config_get("maxmemory"),
            lambda: gateway.keys("*"),
            lambda: gateway.execute_command("SUBSCRIBE", "elsewhere"),
        ):
            with pytest.raises(redis.ResponseError, match=REFUSED):
                call()


def test_the_gateway_user_runs_the_real_quotas_on_quota_keys_only(acl_redis):
    tenant = Tenant(uuid.uuid4().hex, TenantLimits(requests_per_s=2, tokens_per_min=10, max_streams=1))

    async def main():
        client = redis_client(acl_redis.url("gateway"))
        quotas = Quotas(client, QuotaSettings(timeout_s=1.0))
        try:
            await quotas.warm_up()
            admission = await quotas.admit(tenant)
            with pytest.raises(ResourceExhausted):  # the one stream is held: refused by Redis, not by NOPERM
                await quotas.admit(tenant)
            await quotas._renew_once()  # the lease renewal (a script of its own)
            await admission.record_tokens(4)
            await admission.release()
            await quotas.admit(tenant)  # released: admitted again
            return quotas._backoff.failures
        finally:
            await quotas.close()
            await client.aclose()

    assert asyncio.run(main()) == 0  # never fell back to local shares: Redis answered every call
    assert acl_redis.refused() == []
    with acl_redis.client("gateway") as gateway:
        for call in (
            lambda: gateway.eval(QUOTA_LUA, 1, f"{PREFIX}:stats", 1, 60_000),  # outside nlpmesh:q
            lambda: gateway.eval("return redis.call('DEL', KEYS[1])", 1, "nlpmesh:q:x"),  # not a quota command
            lambda: gateway.eval("return redis.call('FLUSHALL')", 0),
        ):
            with pytest.raises(redis.ResponseError, match=REFUSED):
                call()


def test_the_cache_user_keeps_to_the_prompt_cache(acl_redis):
    with acl_redis.client("cache") as cache:
        for call in (
            lambda: cache.get("nlpmesh:kv:anything"),
            lambda: cache.set("nlpmesh:q:anything", 1),
            lambda: cache.eval("return 1", 0),
            lambda: cache.publish("elsewhere", "1"),
            lambda: cache.flushall(),
            lambda: cache.config_get("maxmemory"),
            lambda: cache.keys(f"{PREFIX}:*"),
            lambda: cache.scan(0, match=f"{PREFIX}:*"),
        ):
            with pytest.raises(redis.ResponseError, match=REFUSED):
                call()


def test_the_inference_user_reads_and_writes_prefix_blocks_only(acl_redis):
    blocks = RedisBlocks(acl_redis.url("inference"), budget_s=1.0, key_prefix="nlpmesh:kv")
    keys = [uuid.uuid4().bytes, uuid.uuid4().bytes]
    kv = torch.arange(4, dtype=torch.uint8)
    assert blocks.put([(keys[0], kv)]).result() == [keys[0]]
    assert blocks.put([], if_seen=[(keys[1], kv)]).result() == []  # a first sighting: only its marker
    assert blocks.put([], if_seen=[(keys[1], kv)]).result() == [keys[1]]  # seen before: written
    assert blocks.get(keys) == [bytes(kv.numpy()), bytes(kv.numpy())]
    assert not blocks.cooling_down and blocks.writable
    blocks.close()
    assert acl_redis.refused() == []
    with acl_redis.client("inference") as inference:
        for call in (
            lambda: inference.mget([f"nlpmesh:kv:{keys[0].hex()}", f"{PREFIX}:stats"]),
            lambda: inference.get(f"{PREFIX}:stats"),
            lambda: inference.delete(f"nlpmesh:kv:{keys[0].hex()}"),
            lambda: inference.flushall(),
            lambda: inference.config_get("maxmemory"),
            lambda: inference.keys("nlpmesh:kv:*"),
            lambda: inference.publish(f"{PREFIX}:invalidations", "1"),
        ):
            with pytest.raises(redis.ResponseError, match=REFUSED):
                call()


def test_the_default_user_is_off_and_a_wrong_password_is_refused(acl_redis):
    with redis.Redis.from_url(acl_redis.server.url) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    wrong = acl_redis.url("cache").replace(acl_redis.users.passwords["cache"], "not-the-password-at-all")
    with redis.Redis.from_url(wrong) as client, pytest.raises(redis.AuthenticationError):
        client.ping()


def test_redis_server_refuses_the_shipped_template_as_it_is():
    port = free_port()
    started = subprocess.run([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--aclfile", str(TEMPLATE)], capture_output=True, text=True, timeout=10)
    assert started.returncode != 0
    assert "ACL" in started.stdout + started.stderr
