"""The near tier in front of a real private redis-server."""
import asyncio
import uuid

from meshkit.sampling import Sampling
from promptcache.keys import PromptCacheKey, TemplatePrompt
from promptcache.near_tier import NearCache
from promptcache.redis_tier import CachedAnswer, PromptCache, redis_client
from tests.conftest import running_redis_server
from tests.polling import until

ANSWER = CachedAnswer(text="Paris.", finish_reason=1, prompt_tokens=12, completion_tokens=2, model="m1")


def key(tenant="acme", country="France") -> PromptCacheKey:
    return PromptCacheKey(tenant, "m1", "r1", TemplatePrompt("capital", "1", {"country": country}),
                          Sampling(max_new_tokens=8))


def store(url: str, prefix: str) -> PromptCache:
    return PromptCache(redis_client(url), prefix=prefix, ttl_s=60, timeout_s=0.2)


async def subscribed(cache: PromptCache) -> bool:
    """A client listens on ``cache``'s invalidations channel."""
    [(_, listeners)] = await cache.redis.pubsub_numsub(cache.invalidations_channel)
    return listeners >= 1


def test_a_second_hit_is_served_without_redis():
    with running_redis_server() as server:
        async def main():
            near = NearCache(store(server.url, "t:near"), max_bytes=1 << 20, max_age_s=60)
            assert await near.backing.store(key(), ANSWER)
            assert await near.lookup(key()) == ANSWER
            server.stop()
            assert await near.lookup(key()) == ANSWER  # from memory: Redis is gone
            assert await near.lookup(key(country="Spain")) is None  # a miss, not an error
            await near.backing.close()

        asyncio.run(main())


def test_tenants_never_share_a_near_entry(redis_server):
    async def main():
        near = NearCache(store(redis_server, f"t:{uuid.uuid4().hex}"), max_bytes=1 << 20, max_age_s=60)
        assert await near.backing.store(key(tenant="acme"), ANSWER)
        assert await near.lookup(key(tenant="acme")) == ANSWER
        assert await near.lookup(key(tenant="globex")) is None
        await near.backing.close()

    asyncio.run(main())


def test_an_invalidation_elsewhere_clears_every_near_tier(redis_server):
    prefix = f"t:{uuid.uuid4().hex}"

    async def main():
        near = NearCache(store(redis_server, prefix), max_bytes=1 << 20, max_age_s=60)
        near.start()
        admin = store(redis_server, prefix)  # the cache service, another client
        try:
            assert await admin.store(key(), ANSWER)
            assert await near.lookup(key()) == ANSWER and len(near) == 1
            await until(lambda: subscribed(admin), timeout_s=3, what="the near tier subscribed")
            assert await admin.invalidate_template("capital") == 1
            await until(lambda: len(near) == 0, timeout_s=3, what="the near tier's copy dropped")
            assert await near.lookup(key()) is None
        finally:
            await near.close()
            await admin.close()

    asyncio.run(main())


def test_near_hits_reach_the_shared_stats(redis_server):
    prefix = f"t:{uuid.uuid4().hex}"

    async def main():
        near = NearCache(store(redis_server, prefix), max_bytes=1 << 20, max_age_s=60, flush_every_s=0.05)
        near.start()
        admin = store(redis_server, prefix)
        try:
            assert await admin.store(key(), ANSWER)
            for _ in range(5):
                assert await near.lookup(key()) == ANSWER  # 1 Redis hit, then 4 near hits

            async def hits() -> int:
                return (await admin.stats()).hits

            async def flushed() -> bool:
                return await hits() >= 5

            await until(flushed, timeout_s=3, what="the near hits flushed to the shared stats")
            assert await hits() == 5  # each counted once
        finally:
            await near.close()
            await admin.close()

    asyncio.run(main())


def test_the_subscription_survives_idle_periods_longer_than_the_socket_timeout(redis_server):
    prefix = f"t:{uuid.uuid4().hex}"

    async def main():
        client = redis_client(redis_server, admin_timeout_s=0.3)
        near = NearCache(PromptCache(client, prefix=prefix, ttl_s=60, timeout_s=0.2), max_bytes=1 << 20,
                         max_age_s=60)
        near.start()
        admin = store(redis_server, prefix)
        try:
            assert await admin.store(key(), ANSWER)
            await asyncio.sleep(1.0)  # idle for over three socket timeouts
            assert await near.lookup(key()) == ANSWER
            await asyncio.sleep(1.0)
            assert len(near) == 1, "an idle subscription must not clear the near tier"
        finally:
            await near.close()
            await admin.close()

    asyncio.run(main())


def test_answers_served_from_memory_are_touched_in_redis_so_lru_keeps_them(redis_server):
    # allkeys-lru evicts by idle time; Redis's LRU clock counts whole seconds.
    prefix = f"t:{uuid.uuid4().hex}"

    async def main():
        near = NearCache(store(redis_server, prefix), max_bytes=1 << 20, max_age_s=60)
        assert await near.backing.store(key(country="France"), ANSWER)
        assert await near.backing.store(key(country="Spain"), ANSWER)
        assert await near.lookup(key(country="France")) == ANSWER  # from Redis, now held in memory
        raw = near.backing.redis
        hot, cold = key(country="France").redis_key(prefix), key(country="Spain").redis_key(prefix)
        await asyncio.sleep(2.1)  # both keys age in Redis by at least 2 s
        for _ in range(3):
            assert await near.lookup(key(country="France")) == ANSWER  # served from memory
        await near._flush()
        assert await raw.object("idletime", hot) <= 1
        assert await raw.object("idletime", cold) >= 2
        await near.backing.close()

    asyncio.run(main())
