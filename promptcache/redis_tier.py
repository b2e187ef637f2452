"""The exact-match prompt cache over Redis (redis.asyncio).

Redis key layout (``<ns>`` = ``<prefix>:t:<tenant_tag>``, see keys.py):

    <ns>:e:<digest>             the answer, compact JSON, with a TTL
    <ns>:ix:tpl:<sha(id)[:16]>  sorted set of entry keys made from that template
    <ns>:ix:model:<sha(m)[:16]> sorted set of entry keys made by that model
    <prefix>:tenants            sorted set of tenant tags (for "every tenant")
    <prefix>:stats              hash: hits, misses, stores (global across replicas)

Index members are scored by their expiry time; each store drops the expired
members of the indexes it touches and keeps each index's own TTL at least as
long as its newest member, so indexes neither grow forever nor outlive use.

A cache that fails is a miss: lookup and store never raise, they log a
rate-limited warning and answer None / False within ``timeout_s``.
Invalidation and stats are admin calls: they raise ``Unavailable`` instead.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
from nlpmesh.cache.v1 import cache_pb2
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from meshkit import span_names
from meshkit.errors import Unavailable
from meshkit.redis_connect import redact_url, redis_from_url
from meshkit.tracing.provider import tracer
from promptcache import metrics
from promptcache.keys import PromptCacheKey, TemplatePrompt, tenant_namespace, tenant_tag

log = logging.getLogger("nlpmesh.cache")
_tracer = tracer("cache")

ADMIN_TIMEOUT_S = 5.0
WARN_EVERY_S = 10.0

# One round trip on the hot path: read the entry and count the hit or miss.
# pcall: a Redis that refuses writes (full under noeviction) still serves the
# answer; only the count is lost.
_LOOKUP_LUA = """
local answer = redis.call('GET', KEYS[1])
redis.pcall('HINCRBY', KEYS[2], answer and 'hits' or 'misses', 1)
return answer
"""


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int
    model: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> CachedAnswer:
        """Raises ValueError for anything that is not an answer this code wrote."""
        fields = json.loads(raw)
        if not isinstance(fields, dict) or set(fields) != set(cls.__dataclass_fields__):
            raise ValueError("not a cached answer")
        answer = cls(**fields)
        types = (answer.text, str), (answer.model, str), (answer.finish_reason, int)
        counts = (answer.prompt_tokens, answer.completion_tokens)
        if not all(isinstance(v, t) for v, t in types) or not all(isinstance(n, int) for n in counts):
            raise ValueError("a cached answer field has the wrong type")
        return answer

    def to_pb(self) -> cache_pb2.CachedAnswer:
        return cache_pb2.CachedAnswer(**asdict(self))

    @classmethod
    def from_pb(cls, pb: cache_pb2.CachedAnswer) -> CachedAnswer:
        return cls(pb.text, pb.finish_reason, pb.prompt_tokens, pb.completion_tokens, pb.model)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    stores: int


def redis_client(url: str, admin_timeout_s: float = ADMIN_TIMEOUT_S) -> aioredis.Redis:
    """A client for the cache. Create it inside the event loop that uses it.

    The socket timeouts bound admin calls; the hot path is bounded tighter by
    ``PromptCache.timeout_s``. One quick retry covers a pooled connection that
    a Redis restart left dead; backoff would only spend the caller's budget.
    Raises RedisUrlError for a URL the mesh does not accept (meshkit/redis_connect.py).
    """
    return redis_from_url(
        aioredis.Redis,
        url,
        socket_timeout=admin_timeout_s,
        socket_connect_timeout=min(admin_timeout_s, 1.0),
        retry=Retry(NoBackoff(), retries=1),
    )


class PromptCache:
    """Exact-match answers in Redis. Lookup and store degrade to a miss / False, never raise."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        ttl_s: int,
        timeout_s: float,
        max_answer_bytes: int = 256 * 1024,
    ):
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.max_answer_bytes = max_answer_bytes
        self._lookup_script = redis.register_script(_LOOKUP_LUA)
        self._warnings = _WarningThrottle(WARN_EVERY_S)

    async def lookup(self, key: PromptCacheKey, timeout_s: float | None = None) -> CachedAnswer | None:
        """The answer or None; slower than ``timeout_s`` (at most the cache's own) is a miss."""
        with _tracer.start_as_current_span(span_names.REDIS_LOOKUP) as span:
            answer = await self._lookup(key, self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s))
            span.set_attribute(span_names.CACHE_HIT, answer is not None)
            return answer

    async def _lookup(self, key: PromptCacheKey, timeout_s: float) -> CachedAnswer | None:
        entry = key.redis_key(self.prefix)
        try:
            raw = await self._bounded(self._lookup_script(keys=[entry, self._stats_key]), timeout_s)
        except asyncio.CancelledError:  # the caller's budget ran out mid-lookup
            metrics.record_miss("cancelled")
            raise
        except Exception as error:  # any failure of the cache is a miss
            metrics.record_miss_for(error)
            self._warnings.warn("prompt cache lookup failed, treating as a miss", error)
            return None
        if raw is None:
            metrics.record_miss("absent")
            return None
        try:
            answer = CachedAnswer.from_json(raw)
        except (ValueError, TypeError) as error:
            metrics.record_miss("corrupt")
            self._warnings.warn("corrupt prompt cache entry, treating as a miss", error)
            await self._recount_as_miss()
            return None
        metrics.record_hit("redis")
        return answer

    async def store(self, key: PromptCacheKey, answer: CachedAnswer, ttl_s: int | None = None) -> bool:
        """Stores a deterministic answer; False if not stored (never raises)."""
        with _tracer.start_as_current_span(span_names.REDIS_STORE):
            return await self._store(key, answer, ttl_s)

    async def _store(self, key: PromptCacheKey, answer: CachedAnswer, ttl_s: int | None) -> bool:
        if not key.sampling.deterministic:
            metrics.record_store("skipped")
            return False
        payload = answer.to_json()
        if len(payload.encode("utf-8")) > self.max_answer_bytes:
            metrics.record_store("skipped")
            log.warning("prompt cache: answer over %d bytes not stored", self.max_answer_bytes)
            return False
        ttl = ttl_s if ttl_s and ttl_s > 0 else self.ttl_s
        try:
            await self._bounded(self._store_transaction(key, payload, ttl))
        except Exception as error:
            metrics.record_store("failed")
            self._warnings.warn("prompt cache store failed", error)
            return False
        metrics.record_store("stored")
        return True

    async def invalidate_template(self, template_id: str, tenant: str | None = None) -> int:
        removed = await self._invalidate(f"ix:tpl:{_short_hash(template_id)}", tenant)
        metrics.record_invalidation("template", removed)
        return removed

    async def invalidate_model(self, model: str, tenant: str | None = None) -> int:
        removed = await self._invalidate(f"ix:model:{_short_hash(model)}", tenant)
        metrics.record_invalidation("model", removed)
        return removed

    async def stats(self) -> CacheStats:
        counts = await self._admin(self.redis.hmget(self._stats_key, ["hits", "misses", "stores"]))
        hits, misses, stores = (int(count or 0) for count in counts)
        return CacheStats(hits=hits, misses=misses, stores=stores)

    async def add_hits(self, count: int) -> bool:
        """Counts hits served elsewhere (the near tier); False if Redis didn't take them."""
        try:
            await self._bounded(self.redis.hincrby(self._stats_key, "hits", count), max(self.timeout_s, 1.0))
        except Exception as error:
            self._warnings.warn("prompt cache stats update failed", error)
            return False
        return True

    async def warm_up(self) -> None:
        """Opens a connection and loads the lookup script, so the first lookup is a plain one."""
        try:
            await self._bounded(self.redis.script_load(_LOOKUP_LUA), 1.0)
        except Exception as error:
            self._warnings.warn("prompt cache unreachable at start; lookups are misses until it answers", error)

    async def ping(self) -> bool:
        try:
            return bool(await self._bounded(self.redis.ping(), max(self.timeout_s, 1.0)))
        except Exception:
            return False

    async def close(self) -> None:
        await self.redis.aclose()

    @property
    def _stats_key(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def _tenants_key(self) -> str:
        return f"{self.prefix}:tenants"

    async def _store_transaction(self, key: PromptCacheKey, payload: str, ttl: int) -> None:
        namespace = tenant_namespace(self.prefix, key.tenant)
        entry = key.redis_key(self.prefix)
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(entry, payload, ex=ttl)
        indexes = [f"{namespace}:ix:model:{_short_hash(key.model)}"]
        if isinstance(key.prompt, TemplatePrompt):
            indexes.append(f"{namespace}:ix:tpl:{_short_hash(key.prompt.id)}")
        for index in indexes:
            _index_add(pipe, index, entry, now, ttl)
        _index_add(pipe, self._tenants_key, tenant_tag(key.tenant), now, ttl)
        pipe.hincrby(self._stats_key, "stores", 1)
        await pipe.execute()

    async def _invalidate(self, index_suffix: str, tenant: str | None) -> int:
        with _tracer.start_as_current_span(span_names.REDIS_INVALIDATE) as span:
            removed = await self._remove_indexed(index_suffix, tenant)
            span.set_attribute(span_names.CACHE_REMOVED, removed)
            return removed

    async def _remove_indexed(self, index_suffix: str, tenant: str | None) -> int:
        if tenant is not None:
            tags = [tenant_tag(tenant)]
        else:
            tags = [t.decode() for t in await self._admin(self.redis.zrange(self._tenants_key, 0, -1))]
        indexes = [f"{self.prefix}:t:{tag}:{index_suffix}" for tag in tags]
        read = self.redis.pipeline(transaction=False)
        for index in indexes:
            read.zrange(index, 0, -1)
        members_per_index = await self._admin(read.execute())
        # ZREM what was read rather than DEL the index: a store racing with
        # this call keeps its index entry.
        write = self.redis.pipeline(transaction=True)
        for index, members in zip(indexes, members_per_index):
            if members:
                write.delete(*members)
                write.zrem(index, *members)
        if len(write) == 0:
            await self._announce_invalidation()
            return 0
        results = await self._admin(write.execute())
        await self._announce_invalidation()
        return sum(results[0::2])

    @property
    def invalidations_channel(self) -> str:
        """Every invalidation is announced here, so near tiers (near.py) drop their copies."""
        return f"{self.prefix}:invalidations"

    async def _announce_invalidation(self) -> None:
        await self._admin(self.redis.publish(self.invalidations_channel, b"1"))

    async def _recount_as_miss(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(self._stats_key, "hits", -1)
            pipe.hincrby(self._stats_key, "misses", 1)
            await self._bounded(pipe.execute())
        except Exception as error:
            self._warnings.warn("prompt cache stats update failed", error)

    async def _bounded(self, call, timeout_s: float | None = None):
        return await asyncio.wait_for(call, timeout_s or self.timeout_s)

    async def _admin(self, call):
        try:
            return await asyncio.wait_for(call, ADMIN_TIMEOUT_S)
        except (TimeoutError, aioredis.RedisError, OSError) as error:
            log.warning("prompt cache admin call failed: %s", _describe(error))
            raise Unavailable("the prompt cache's Redis is unavailable") from None


def _index_add(pipe, index: str, member: str, now: float, ttl: int) -> None:
    """Adds a member scored by its expiry, drops expired ones, stretches the index TTL."""
    pipe.zadd(index, {member: now + ttl})
    pipe.zremrangebyscore(index, "-inf", now)
    pipe.expire(index, ttl, nx=True)
    pipe.expire(index, ttl, gt=True)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _describe(error: BaseException) -> str:
    # Only a connection failure's text (where, why) is shown: a reply error's or a decode error's may quote a payload.
    text = redact_url(str(error))[:200] if isinstance(error, (OSError, aioredis.ConnectionError)) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _WarningThrottle:
    """At most one warning per interval, so a dead Redis does not flood the log."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._last = -float("inf")
        self._suppressed = 0

    def warn(self, message: str, error: BaseException) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} similar suppressed)" if self._suppressed else ""
        log.warning("%s: %s%s", message, _describe(error), more)
        self._last, self._suppressed = now, 0
