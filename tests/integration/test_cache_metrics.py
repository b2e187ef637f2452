"""Prompt cache hit, miss, store and invalidation counters, against a real private redis-server."""
import asyncio
import socket
import uuid

import pytest
from prometheus_client import REGISTRY

from meshkit.sampling import Sampling
from promptcache.keys import PromptCacheKey, TemplatePrompt
from promptcache.near_tier import NearCache
from promptcache.redis_tier import CachedAnswer, PromptCache, redis_client
from tests.conftest import until_redis_blocked

ANSWER = CachedAnswer(text="Paris.", finish_reason=1, prompt_tokens=12, completion_tokens=2, model="m1")


def key(country="France", temperature=0.0) -> PromptCacheKey:
    return PromptCacheKey("acme", "m1", "r1", TemplatePrompt("capital", "1", {"country": country}),
                          Sampling(max_new_tokens=8, temperature=temperature))


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def counts() -> dict[str, float]:
    return {
        "near": sample("nlpmesh_cache_hits_total", tier="near"),
        "redis": sample("nlpmesh_cache_hits_total", tier="redis"),
        **{reason: sample("nlpmesh_cache_misses_total", reason=reason)
           for reason in ("absent", "corrupt", "error", "timeout", "cancelled")},
        **{f"store_{result}": sample("nlpmesh_cache_stores_total", result=result)
           for result in ("stored", "skipped", "failed")},
        "invalidations": sample("nlpmesh_cache_invalidations_total", scope="template"),
        "invalidated": sample("nlpmesh_cache_invalidated_entries_total"),
    }


def moved(before: dict, after: dict) -> dict:
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


def run(url: str, body, timeout_s: float = 0.5):
    async def main():
        cache = PromptCache(redis_client(url), prefix=f"test:{uuid.uuid4().hex}", ttl_s=60, timeout_s=timeout_s)
        try:
            return await body(cache)
        finally:
            await cache.close()

    before = counts()
    asyncio.run(main())
    return moved(before, counts())


def test_redis_hits_misses_stores_and_invalidations_are_counted(redis_server):
    async def body(cache):
        assert await cache.lookup(key()) is None
        assert await cache.store(key(), ANSWER)
        assert await cache.store(key(temperature=0.7), ANSWER) is False  # sampled: never stored
        assert await cache.lookup(key()) == ANSWER
        assert await cache.invalidate_template("capital", "acme") == 1

    assert run(redis_server, body) == {
        "absent": 1, "redis": 1, "store_stored": 1, "store_skipped": 1, "invalidations": 1, "invalidated": 1,
    }


def test_a_corrupt_entry_counts_as_a_corrupt_miss(redis_server):
    async def body(cache):
        await cache.redis.set(key().redis_key(cache.prefix), b"not json")
        assert await cache.lookup(key()) is None

    assert run(redis_server, body) == {"corrupt": 1}


def test_an_unreachable_redis_counts_errors_not_hits():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"  # bound, never listening

    async def body(cache):
        assert await cache.lookup(key()) is None
        assert await cache.store(key(), ANSWER) is False

    assert run(url, body, timeout_s=0.05) == {"error": 1, "store_failed": 1}


def test_a_slow_redis_counts_a_timeout_miss(redis_server):
    async def body(cache):
        await cache.lookup(key(country="warm"))  # connection and script ready (within the cache's 0.5 s)
        blocker = redis_client(redis_server)
        await blocker.ping()  # its connection open, so the DEBUG SLEEP goes out at once
        sleeping = asyncio.create_task(blocker.execute_command("DEBUG", "SLEEP", "0.3"))
        await until_redis_blocked(redis_server)
        assert await cache.lookup(key(), timeout_s=0.05) is None
        await sleeping
        await blocker.aclose()

    assert run(redis_server, body) == {"absent": 1, "timeout": 1}


def test_a_lookup_cut_short_by_the_callers_budget_counts_as_cancelled(redis_server):
    async def body(cache):
        await cache.lookup(key(country="warm"))
        blocker = redis_client(redis_server)
        await blocker.ping()
        sleeping = asyncio.create_task(blocker.execute_command("DEBUG", "SLEEP", "0.3"))
        await until_redis_blocked(redis_server)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):  # what the gateway does with the cache hop's budget
                await cache.lookup(key())
        await sleeping
        await blocker.aclose()

    assert run(redis_server, body, timeout_s=1.0) == {"absent": 1, "cancelled": 1}


def test_near_tier_hits_are_counted_apart_from_redis_hits(redis_server):
    async def body(cache):
        near = NearCache(cache, max_bytes=1 << 20, max_age_s=60)
        assert await cache.store(key(), ANSWER)
        assert await near.lookup(key()) == ANSWER  # from Redis, now held near
        assert await near.lookup(key()) == ANSWER
        assert await near.lookup(key()) == ANSWER

    assert run(redis_server, body) == {"store_stored": 1, "redis": 1, "near": 2}
