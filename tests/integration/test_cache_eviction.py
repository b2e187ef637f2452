"""The prompt cache under a Redis that evicts or refuses writes: misses, never errors or wrong answers.

Each test runs its own tiny redis-server (``--maxmemory 2mb``, tests/conftest.py).
"""
import asyncio
import logging
import uuid

import pytest
import redis

from meshkit.errors import Unavailable
from meshkit.sampling import Sampling
from promptcache.keys import PromptCacheKey, TemplatePrompt, tenant_namespace
from promptcache.redis_tier import CachedAnswer, PromptCache, redis_client
from tests.conftest import fill_until_refused, running_redis_server

GREEDY = Sampling(max_new_tokens=32, temperature=0.0)
TINY_REDIS = ("--maxmemory", "2mb")


def key(index: int, tenant: str = "acme") -> PromptCacheKey:
    prompt = TemplatePrompt("capital", "1", {"country": f"country {index}"})
    return PromptCacheKey(tenant=tenant, model="m1", revision="r1", prompt=prompt, sampling=GREEDY)


def answer(index: int) -> CachedAnswer:
    return CachedAnswer(text=f"{index} " + "x" * 16000, finish_reason=1, prompt_tokens=12, completion_tokens=2,
                        model="m1")


def run_with_cache(url: str, body):
    async def main():
        cache = PromptCache(redis_client(url), prefix=f"test:{uuid.uuid4().hex}", ttl_s=600, timeout_s=1.0)
        try:
            return await body(cache)
        finally:
            await cache.close()

    return asyncio.run(main())


async def indexed_entries(cache: PromptCache) -> set[str]:
    """The entry keys that some invalidation index still lists."""
    members = set()
    async for index in cache.redis.scan_iter(match=f"{cache.prefix}:t:*:ix:*"):
        members.update(member.decode() for member in await cache.redis.zrange(index, 0, -1))
    return members


def test_evicted_answers_and_indexes_are_misses_and_invalidation_still_works():
    with running_redis_server(*TINY_REDIS, "--maxmemory-policy", "allkeys-lru") as server:
        async def body(cache):
            for index in range(200):  # 200 x 16 KB: more than fits
                assert await cache.store(key(index), answer(index))
            found = [await cache.lookup(key(index)) for index in range(200)]
            assert all(got in (None, answer(index)) for index, got in enumerate(found))
            assert 0 < sum(got is not None for got in found) < 200
            # Evictions done: none from here on, else any write near the limit (a stats count, the
            # invalidation's announcement) could evict an index listed below before the invalidation reads it.
            await cache.redis.config_set("maxmemory", 0)
            indexed = await indexed_entries(cache)
            await cache.invalidate_template("capital")  # every tenant: the tenant list may be gone
            await cache.invalidate_template("capital", tenant="acme")
            await cache.invalidate_model("m1", tenant="acme")
            found = {key(index).redis_key(cache.prefix): await cache.lookup(key(index)) for index in range(200)}
            assert all(got in (None, answer(index)) for index, got in enumerate(found.values()))
            # Left: only entries whose index memberships were evicted (README: Sizing Redis).
            assert {entry for entry, got in found.items() if got is not None}.isdisjoint(indexed)
            await cache.stats()  # the stats hash may have been evicted too

        run_with_cache(server.url, body)
        with redis.Redis.from_url(server.url) as client:
            assert client.info("stats")["evicted_keys"] > 0


def test_invalidation_with_each_of_its_keys_evicted_removes_what_is_left(redis_server):
    async def body(cache):
        for index in range(3):
            await cache.store(key(index), answer(index))
            await cache.store(key(index, tenant="globex"), answer(index))
        namespace = tenant_namespace(cache.prefix, "acme")
        evicted = [key(0).redis_key(cache.prefix), f"{cache.prefix}:tenants"]  # an entry, the tenant list
        evicted += [name.decode() for name in await cache.redis.keys(f"{namespace}:*:ix:tpl")]  # acme's index
        await cache.redis.delete(*evicted)
        assert await cache.invalidate_template("capital", tenant="acme") == 0  # its index is gone
        assert await cache.invalidate_template("capital") == 0  # no tenant list: none to visit
        assert await cache.invalidate_model("m1", tenant="acme") == 2  # entry 0 was gone already
        assert await cache.invalidate_template("capital", tenant="globex") == 3
        assert [await cache.lookup(key(index, tenant)) for index in range(3) for tenant in ("acme", "globex")] == [
            None] * 6

    run_with_cache(redis_server, body)


def test_a_full_redis_under_noeviction_refuses_stores_as_throttled_misses_and_still_serves(caplog):
    with running_redis_server(*TINY_REDIS, "--maxmemory-policy", "noeviction") as server:
        async def body(cache):
            assert await cache.store(key(0), answer(0))
            fill_until_refused(server.url)
            with caplog.at_level(logging.WARNING, logger="nlpmesh.cache"):
                assert [await cache.store(key(index), answer(index)) for index in range(1, 6)] == [False] * 5
                assert await cache.lookup(key(0)) == answer(0)  # a hit, though its count cannot be written
                assert await cache.lookup(key(1)) is None
            warnings = [record.getMessage() for record in caplog.records]
            assert len(warnings) == 1 and "store failed: refused (OutOfMemoryError)" in warnings[0]
            # Redis refuses any MULTI when full, so invalidation is an admin call that fails, as documented.
            with pytest.raises(Unavailable):
                await cache.invalidate_model("m1")

        run_with_cache(server.url, body)
