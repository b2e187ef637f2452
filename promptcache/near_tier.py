"""The near tier: a small in-process copy of hot answers in front of Redis.

A cache hit that needs no Redis round trip costs the caller only the gateway
hop. This is safe because an entry's key names everything that made the answer
(tenant, model revision, template version, variables, sampling): an entry can
only go stale by an explicit invalidation. The cache service announces each one
on a Redis channel and every near tier clears itself; if the subscription was
down (so an announcement may have been missed) the tier is cleared on
reconnect, and ``max_age_s`` bounds any staleness that slips through.

Hits served here are counted locally and added to the shared Redis stats
every ``flush_every_s``. The same flush TOUCHes the Redis keys of the answers
served here since the last one (at most ``_MAX_TOUCHED`` of them): Redis never
sees those reads, and without the touch its LRU eviction (maxmemory with
allkeys-lru) would take the hottest answers first.
"""
from __future__ import annotations

import asyncio
import logging

from cachetools import TTLCache
from opentelemetry import trace

from meshkit import span_names
from meshkit.redis_failure import describe_failure
from promptcache import metrics
from promptcache.keys import PromptCacheKey
from promptcache.redis_tier import CachedAnswer, PromptCache

log = logging.getLogger("nlpmesh.cache.near")

_ENTRY_OVERHEAD_BYTES = 256
_RECONNECT_S = 1.0
_MAX_TOUCHED = 1024  # keys touched per flush; a hotter set is touched in part, the rest next time


class NearCache:
    def __init__(self, backing: PromptCache, max_bytes: int, max_age_s: float, flush_every_s: float = 1.0):
        self.backing = backing
        self._entries: TTLCache = TTLCache(
            maxsize=max_bytes, ttl=max_age_s,
            getsizeof=lambda answer: len(answer.text.encode()) + _ENTRY_OVERHEAD_BYTES,
        )
        self._flush_every_s = flush_every_s
        self._unflushed_hits = 0
        self._touched: set[str] = set()
        self._tasks: list[asyncio.Task] = []

    async def lookup(self, key: PromptCacheKey, timeout_s: float | None = None) -> CachedAnswer | None:
        """From memory, else from Redis within ``timeout_s`` (a miss when slower)."""
        entry = key.redis_key(self.backing.prefix)
        answer = self._entries.get(entry)
        if answer is not None:
            self._unflushed_hits += 1
            if len(self._touched) < _MAX_TOUCHED:
                self._touched.add(entry)
            metrics.record_hit("near")
            # No span for a hit this cheap: the caller's span (the gateway's cache hop) says where it came from.
            trace.get_current_span().set_attribute(span_names.CACHE_TIER, "near")
            return answer
        answer = await self.backing.lookup(key, timeout_s)
        if answer is not None and len(answer.text.encode()) + _ENTRY_OVERHEAD_BYTES <= self._entries.maxsize:
            self._entries[entry] = answer
        return answer

    async def warm_up(self) -> None:
        await self.backing.warm_up()

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def start(self) -> None:
        """Starts listening for invalidations and flushing hit counts (inside the loop)."""
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._flush_forever())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush()
        await self.backing.close()  # the near tier owns its backing store

    async def _listen(self) -> None:
        while True:
            try:
                # A cluster client learns its slot map on its first command, and can open no
                # pubsub before: one ping first (a failed one is retried below, as a lost channel).
                await self.backing.ping()
                async with self.backing.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.backing.invalidations_channel)
                    self.clear()  # announcements made while unsubscribed were missed
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.clear()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.clear()
                log.warning("near cache: invalidation channel lost (%s); retrying", describe_failure(error))
                await asyncio.sleep(_RECONNECT_S)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_every_s)
            await self._flush()

    async def _flush(self) -> None:
        hits, self._unflushed_hits = self._unflushed_hits, 0
        if hits and not await self.backing.add_hits(hits):
            self._unflushed_hits += hits
        touched, self._touched = self._touched, set()
        if touched:
            await self._touch(touched)

    async def _touch(self, keys: set[str]) -> None:
        """Marks ``keys`` used in Redis's LRU: one pipelined TOUCH per key (a cluster splits it by node)."""
        try:
            async with self.backing.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.touch(key)
                await asyncio.wait_for(pipe.execute(), self._flush_every_s)
        except Exception as error:  # a missed touch only ages an entry sooner
            log.warning("near cache: touching served keys failed (%s)", describe_failure(error))
