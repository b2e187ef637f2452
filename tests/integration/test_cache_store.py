"""PromptCache against a real private redis-server (tests/conftest.py)."""
import asyncio
import logging
import socket
import time
import uuid

import pytest

from meshkit.errors import Unavailable
from meshkit.sampling import Sampling
from promptcache import keys
from promptcache.keys import ChatPrompt, PromptCacheKey, TemplatePrompt, tenant_tag
from promptcache.redis_tier import CachedAnswer, PromptCache, redis_client
from tests.conftest import until_redis_blocked

GREEDY = Sampling(max_new_tokens=32, temperature=0.0)
ANSWER = CachedAnswer(text="Paris.", finish_reason=1, prompt_tokens=12, completion_tokens=2, model="m1")


def key(tenant="acme", template="capital", model="m1", sampling=GREEDY, country="France") -> PromptCacheKey:
    prompt = TemplatePrompt(template, "1", {"country": country})
    return PromptCacheKey(tenant=tenant, model=model, revision="r1", prompt=prompt, sampling=sampling)


def run_with_cache(url: str, body, ttl_s: int = 60, timeout_s: float = 0.5, **options):
    """Runs ``body(cache)`` in a fresh event loop with a cache under a prefix of its own."""

    async def main():
        cache = PromptCache(
            redis_client(url), prefix=f"test:{uuid.uuid4().hex}", ttl_s=ttl_s, timeout_s=timeout_s, **options
        )
        try:
            return await body(cache)
        finally:
            await cache.close()

    return asyncio.run(main())


def test_store_then_lookup_hits(redis_server):
    async def body(cache):
        assert await cache.lookup(key()) is None
        assert await cache.store(key(), ANSWER) is True
        assert await cache.lookup(key()) == ANSWER
        assert await cache.lookup(key(country="Spain")) is None

    run_with_cache(redis_server, body)


def test_chat_prompts_are_cached_too(redis_server):
    chat = PromptCacheKey("acme", "m1", "r1", ChatPrompt((("user", "hi"),)), GREEDY)

    async def body(cache):
        assert await cache.store(chat, ANSWER)
        assert await cache.lookup(chat) == ANSWER

    run_with_cache(redis_server, body)


def test_non_deterministic_answers_are_not_stored(redis_server):
    sampled = key(sampling=Sampling(max_new_tokens=32, temperature=0.8))
    seeded = key(sampling=Sampling(max_new_tokens=32, temperature=0.8, seed=3))

    async def body(cache):
        assert await cache.store(sampled, ANSWER) is False
        assert await cache.lookup(sampled) is None
        assert await cache.store(seeded, ANSWER) is True
        assert await cache.lookup(seeded) == ANSWER

    run_with_cache(redis_server, body)


def test_entries_get_the_default_or_given_ttl(redis_server):
    async def body(cache):
        await cache.store(key(country="Spain"), ANSWER, ttl_s=30)
        assert 0 < await cache.redis.ttl(key(country="Spain").redis_key(cache.prefix)) <= 30
        await cache.store(key(), ANSWER)
        assert 3500 < await cache.redis.ttl(key().redis_key(cache.prefix)) <= 3600
        # The index lives as long as its longest-lived member.
        template_index = keys.template_index(cache.prefix, tenant_tag("acme"), "capital")
        assert 3500 < await cache.redis.ttl(template_index) <= 3600

    run_with_cache(redis_server, body, ttl_s=3600)


def test_every_key_but_the_stats_expires(redis_server):
    async def body(cache):
        await cache.store(key(), ANSWER)
        await cache.store(key(tenant="globex", model="m2"), ANSWER, ttl_s=10)
        names = [name.decode() async for name in cache.redis.scan_iter(match=f"{cache.prefix}:*")]
        assert len(names) == 1 + 2 * 3 + 1  # stats, per tenant (entry, 2 indexes), tenants
        for name in names:
            if name != f"{cache.prefix}:stats":
                assert await cache.redis.ttl(name) > 0, name

    run_with_cache(redis_server, body)


def test_indexes_drop_expired_members(redis_server):
    async def body(cache):
        await cache.store(key(country="Italy"), ANSWER)
        await cache.store(key(country="Spain"), ANSWER, ttl_s=1)
        await asyncio.sleep(1.1)  # past Spain's 1 s TTL: time passing is what is tested
        await cache.store(key(), ANSWER)
        template_index = keys.template_index(cache.prefix, tenant_tag("acme"), "capital")
        members = {m.decode() for m in await cache.redis.zrange(template_index, 0, -1)}
        assert members == {key(country=c).redis_key(cache.prefix) for c in ("Italy", "France")}

    run_with_cache(redis_server, body)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_invalidate_template_removes_only_that_template_and_tenant(redis_server):
    async def body(cache):
        for k in (key(), key(country="Spain"), key(template="other"), key(tenant="globex")):
            assert await cache.store(k, ANSWER)
        assert await cache.invalidate_template("capital", tenant="acme") == 2
        assert await cache.lookup(key()) is None
        assert await cache.lookup(key(country="Spain")) is None
        assert await cache.lookup(key(template="other")) == ANSWER
        assert await cache.lookup(key(tenant="globex")) == ANSWER
        assert await cache.invalidate_template("capital") == 1  # every tenant: globex's is left
        assert await cache.lookup(key(tenant="globex")) is None
        assert await cache.invalidate_template("capital") == 0

    run_with_cache(redis_server, body)


def test_invalidate_model_removes_only_that_model(redis_server):
    chat = PromptCacheKey("acme", "m1", "r1", ChatPrompt((("user", "hi"),)), GREEDY)

    async def body(cache):
        for k in (key(), chat, key(model="m2"), key(tenant="globex")):
            assert await cache.store(k, ANSWER)
        assert await cache.invalidate_model("m1", tenant="globex") == 1
        assert await cache.lookup(key()) == ANSWER
        assert await cache.invalidate_model("m1") == 2
        assert await cache.lookup(key()) is None and await cache.lookup(chat) is None
        assert await cache.lookup(key(model="m2")) == ANSWER

    run_with_cache(redis_server, body)


def test_stats_count_hits_misses_and_stores(redis_server):
    async def body(cache):
        await cache.lookup(key())
        await cache.store(key(), ANSWER)
        await cache.store(key(sampling=Sampling(temperature=0.9)), ANSWER)  # not stored
        await cache.lookup(key())
        await cache.lookup(key())
        return await cache.stats()

    stats = run_with_cache(redis_server, body)
    assert (stats.hits, stats.misses, stats.stores) == (2, 1, 1)


def test_stats_are_shared_by_caches_with_the_same_prefix(redis_server):
    async def body(cache):
        other = PromptCache(redis_client(redis_server), cache.prefix, ttl_s=60, timeout_s=0.5)
        await cache.store(key(), ANSWER)
        await other.lookup(key())
        await other.close()
        return await cache.stats()

    assert run_with_cache(redis_server, body).hits == 1


def test_a_corrupt_entry_is_a_miss(redis_server, caplog):
    async def body(cache):
        await cache.redis.set(key().redis_key(cache.prefix), b"\xff not json")
        assert await cache.lookup(key()) is None
        await cache.redis.set(key().redis_key(cache.prefix), b'{"text": 1}')
        assert await cache.lookup(key()) is None
        return await cache.stats()

    with caplog.at_level(logging.WARNING, logger="nlpmesh.cache"):
        stats = run_with_cache(redis_server, body)
    assert (stats.hits, stats.misses) == (0, 2)
    assert "corrupt" in caplog.text


def test_answers_over_the_size_limit_are_not_stored(redis_server):
    big = CachedAnswer(text="é" * 600, finish_reason=2, prompt_tokens=1, completion_tokens=600, model="m1")

    async def body(cache):
        assert await cache.store(key(), big) is False
        assert await cache.lookup(key()) is None
        assert await cache.store(key(), ANSWER) is True

    run_with_cache(redis_server, body, max_answer_bytes=1000)


def test_unreachable_redis_is_a_quick_miss_and_no_store(caplog):
    url = f"redis://user:s3cret@127.0.0.1:{_closed_port()}/0"

    async def body(cache):
        started = time.monotonic()
        for _ in range(5):
            assert await cache.lookup(key()) is None
        assert await cache.store(key(), ANSWER) is False
        assert time.monotonic() - started < 1.0
        with pytest.raises(Unavailable):
            await cache.invalidate_template("capital")
        assert await cache.ping() is False

    with caplog.at_level(logging.WARNING, logger="nlpmesh.cache"):
        run_with_cache(url, body, timeout_s=0.05)
    lookup_warnings = [r for r in caplog.records if "lookup failed" in r.getMessage()]
    assert len(lookup_warnings) == 1  # rate-limited
    assert "s3cret" not in caplog.text


def test_redis_dying_mid_life_turns_hits_into_misses(disposable_redis_server):
    async def body(cache):
        assert await cache.store(key(), ANSWER)
        assert await cache.lookup(key()) == ANSWER
        disposable_redis_server.stop()
        started = time.monotonic()
        assert await cache.lookup(key()) is None
        assert await cache.store(key(), ANSWER) is False
        assert time.monotonic() - started < 1.0

    # 0.3 s, not the 50 ms default: the healthy store before the stop opens the connection,
    # which a loaded 2-core machine can take longer than 50 ms to do.
    run_with_cache(disposable_redis_server.url, body, timeout_s=0.3)


def test_slow_redis_is_a_miss_within_the_timeout(redis_server):
    async def body(cache):
        await cache.store(key(), ANSWER)
        assert await cache.lookup(key()) == ANSWER  # connection and script ready
        blocker = redis_client(redis_server)
        await blocker.ping()  # its connection open, so the DEBUG SLEEP goes out at once
        sleeping = asyncio.create_task(blocker.execute_command("DEBUG", "SLEEP", "0.3"))
        await until_redis_blocked(redis_server)
        started = time.monotonic()
        # A cache of 50 ms on the same (open) connections: its own timeout bounds the lookup.
        quick = PromptCache(cache.redis, cache.prefix, ttl_s=60, timeout_s=0.05)
        assert await quick.lookup(key()) is None
        elapsed = time.monotonic() - started
        await sleeping
        await blocker.aclose()
        assert elapsed < 0.2
        assert await cache.lookup(key()) == ANSWER  # and it recovers

    # The cache's own 0.5 s for the warm-up: a fresh connection on a loaded machine can take
    # over 50 ms.
    run_with_cache(redis_server, body)
