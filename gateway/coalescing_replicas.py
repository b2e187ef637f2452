"""Request coalescing across gateway replicas, through a short lease per key in Redis.

The flight that starts a generation in one gateway (gateway/coalescing.py) first takes the lease on
its prompt-cache key (promptcache/leases.py: SET NX PX). Holding it, it generates; the lease is renewed
while it runs and released once the answer is stored (or the generation ended without one). Finding
it held by another replica, it waits for the answer that replica stores in the prompt cache, polling,
for at most ``wait_s`` and the caller's budget: the answer comes, or the lease lapses (that replica
died, or failed), or the wait runs out, and then it generates on its own.

Redis failing is never an error: no lease can be taken or read, and each replica coalesces only its
own requests. A CACHE_MODE_REFRESH request asked for a fresh answer: it takes the lease when it can
(so others wait for its answer) but never waits for another replica's stored one.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

from gateway.coalescing import COALESCED, COALESCING_FALLBACKS, SHARED_STORED
from gateway.scope import RequestScope
from meshkit import span_names
from promptcache.keys import PromptCacheKey
from promptcache.leases import GenerationLeases
from promptcache.redis_tier import CachedAnswer

log = logging.getLogger("nlpmesh.gateway")


@dataclass(frozen=True)
class LeaseTimes:
    ttl_s: float = 2.0  # a lease not renewed for this long lapses: its holder is gone
    wait_s: float = 30.0  # the most a request waits for another replica's answer
    poll_s: float = 0.025  # how often a waiting request looks for that answer

    @property
    def ttl_ms(self) -> int:
        return max(int(self.ttl_s * 1000), 1)


class HeldLease:
    """This replica's lease on a key, renewed in the background until ``release``."""

    def __init__(self, leases: GenerationLeases, key: PromptCacheKey, token: str, times: LeaseTimes):
        self._leases, self._key, self._token, self._times = leases, key, token, times
        self._renewing = asyncio.get_running_loop().create_task(self._renew())
        self._released = False

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._times.ttl_s / 3)
            if await self._leases.renew(self._key, self._token, self._times.ttl_ms) is False:
                return  # lapsed and taken by another: theirs now

    async def release(self) -> None:
        """Stops renewing and ends the lease; idempotent, never raises."""
        if self._released:
            return
        self._released = True
        self._renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewing
        await self._leases.release(self._key, self._token)


class ReplicaCoalescing:
    """Leases on keys, and waits for the answers other replicas store under them."""

    def __init__(self, leases: GenerationLeases, times: LeaseTimes):
        self._leases = leases
        self._times = times

    async def lead_or_wait(self, key: PromptCacheKey, scope: RequestScope, may_wait: bool
                           ) -> HeldLease | CachedAnswer | None:
        """A lease to generate under; another replica's stored answer; or None: generate without a lease."""
        begun = time.perf_counter()
        deadline = time.monotonic() + min(self._times.wait_s, max(scope.budget.left_ms(), 0.0) / 1000.0)
        while True:
            token = uuid.uuid4().hex
            taken = await self._leases.acquire(key, token, self._times.ttl_ms)
            if taken:
                return HeldLease(self._leases, key, token, self._times)
            if taken is None or not may_wait:
                return None
            answer = await self._stored_answer(key, deadline)
            if answer is not None:
                scope.record_coalesced(begun, time.perf_counter())
                scope.span.set_attribute(span_names.COALESCED, SHARED_STORED)
                COALESCED.labels(SHARED_STORED).inc()
                return answer
            if time.monotonic() >= deadline:
                COALESCING_FALLBACKS.labels("replica_gave_up").inc()
                log.info("another replica's answer did not come in time: generating here")
                return None

    async def _stored_answer(self, key: PromptCacheKey, deadline: float) -> CachedAnswer | None:
        """The answer another replica stores under ``key``; None once its lease is gone or ``deadline`` passed."""
        while time.monotonic() < deadline:
            answer = await self._leases.stored_answer(key)
            if answer is not None:
                return answer
            held = await self._leases.held(key)
            if not held:  # released (its answer may have just been stored), lapsed, or Redis failing
                answer = await self._leases.stored_answer(key)
                if answer is None and held is False:
                    COALESCING_FALLBACKS.labels("replica_gave_up").inc()
                return answer
            await asyncio.sleep(min(self._times.poll_s, max(deadline - time.monotonic(), 0.0)))
        return None
