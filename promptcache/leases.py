"""Generation leases: which gateway replica is generating the answer to a prompt-cache key right now.

Request coalescing across replicas (gateway/coalescing_replicas.py): the replica that starts a
generation holds a short lease on its key, renewed while it runs and released once its answer is
stored; a replica that finds the lease taken waits for that stored answer instead of generating it
again. The lease lives in the prompt cache's key namespace, next to the answer it stands for:

    <prefix>:t:<tenant_tag>:lease:<key.digest()>    a random token of the holder, with a PX expiry

A lease is only an optimisation: every call here answers None when Redis fails (and Redis is then
left alone for a while, meshkit/redis_failure.py), and the caller generates on its own.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from meshkit.redis_failure import REDIS_FAILURES, RedisBackoff, describe_failure
from promptcache.keys import PromptCacheKey, tenant_namespace
from promptcache.redis_tier import CachedAnswer

log = logging.getLogger("nlpmesh.cache")

# Renew or release only the holder's own lease: one that lapsed and was taken by another stays theirs.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(prefix: str, key: PromptCacheKey) -> str:
    """Where the lease on ``key``'s generation lives: the tenant's namespace, the key's digest."""
    return f"{tenant_namespace(prefix, key.tenant)}:lease:{key.digest()}"


class GenerationLeases:
    """SET NX PX leases on prompt-cache keys, and a quiet read of the answer a lease stands for."""

    def __init__(self, redis, prefix: str, timeout_s: float, cooldown_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.redis = redis
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._backoff = RedisBackoff(cooldown_s, clock)
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    async def acquire(self, key: PromptCacheKey, token: str, ttl_ms: int) -> bool | None:
        """True: the lease is ``token``'s now; False: another holds it; None: Redis failed."""
        reply = await self._call(lambda: self.redis.set(lease_key(self.prefix, key), token, nx=True, px=ttl_ms),
                                 writes=True)
        return None if reply is _FAILED else bool(reply)

    async def renew(self, key: PromptCacheKey, token: str, ttl_ms: int) -> bool | None:
        """True while the lease is still ``token``'s (its expiry pushed back); None: Redis failed."""
        reply = await self._call(lambda: self._renew(keys=[lease_key(self.prefix, key)], args=[token, ttl_ms]),
                                 writes=True)
        return None if reply is _FAILED else bool(reply)

    async def release(self, key: PromptCacheKey, token: str) -> None:
        """Ends ``token``'s lease, if it still holds it; a failure only lets it expire."""
        await self._call(lambda: self._release(keys=[lease_key(self.prefix, key)], args=[token]), writes=True)

    async def held(self, key: PromptCacheKey) -> bool | None:
        """Whether anyone holds the lease on ``key``; None: Redis failed."""
        reply = await self._call(lambda: self.redis.exists(lease_key(self.prefix, key)), writes=False)
        return None if reply is _FAILED else bool(reply)

    async def stored_answer(self, key: PromptCacheKey) -> CachedAnswer | None:
        """The answer stored under ``key``, read without counting a hit or miss (a follower polls it)."""
        raw = await self._call(lambda: self.redis.get(key.redis_key(self.prefix)), writes=False)
        if raw is _FAILED or raw is None:
            return None
        try:
            return CachedAnswer.from_json(raw)
        except (ValueError, TypeError):
            return None  # a corrupt entry: the lookup path reports it; here it is only not an answer

    async def _call(self, call, writes: bool):
        if not (self._backoff.may_write() if writes else self._backoff.may_read()):
            return _FAILED
        try:
            reply = await asyncio.wait_for(call(), self.timeout_s)
        except REDIS_FAILURES as error:
            if self._backoff.failed(error):
                log.warning("generation lease call failed, coalescing within this replica only: %s",
                            describe_failure(error))
            return _FAILED
        if self._backoff.answered():
            log.info("generation leases answer again")
        return reply


_FAILED = object()  # Redis failed (or is cooling down): distinct from a None reply
