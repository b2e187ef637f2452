"""The exact-match prompt cache over Redis (redis.asyncio).

Redis key layout (``<ns>`` = ``<prefix>:t:<tag>``, ``<tag>`` = the tenant's hash,
``<T>``/``<M>`` = sha of the template id / model, 16 hex; see keys.py):

    <ns>:{<tag>:tpl:<T>}:e:<digest>    a template's answer, compact JSON, with a TTL
    <ns>:e:<digest>                    a chat answer (no hash tag: it is only ever touched alone)
    <ns>:{<tag>:tpl:<T>}:ix:tpl        sorted set of the entry keys made from that template
    <ns>:{<tag>:model:<M>}:ix:model    sorted set of the entry keys made by that model
    <prefix>:tenants                   sorted set of tenant tags (for "every tenant")
    <prefix>:stats                     hash: hits, misses, stores (global across replicas)
    <prefix>:stats:{s<n>}              the same, in STATS_SHARDS shards, on a Redis Cluster

On a Redis Cluster (a ``redis+cluster://`` URL, meshkit/redis_connect.py) the
``{...}`` hash tags keep every multi-key operation inside one slot: a
template's answers and its index share one (tenant + template), so storing an
answer and invalidating a template are one transaction each, and the load
spreads over the masters by tenant and template rather than landing on one.
What cannot share a slot is done in separate round trips there: a store
updates the model index, the tenant list and the stats first, then writes the
answer with its template index in one transaction; a lookup is a plain GET
and its hit or miss is counted just after, off the caller's path; an
invalidation deletes the indexed answers slot by slot, then removes them from
the index. The stats hash is sharded so that counting does not load one node.

Index members are scored by their expiry time; each store drops the expired
members of the indexes it touches and keeps each index's own TTL at least as
long as its newest member, so indexes neither grow forever nor outlive use.

A cache that fails is a miss: lookup and store never raise, they log a
rate-limited warning and answer None / False within ``timeout_s``. After a
failure Redis is left alone for ``cooldown_s`` (the mesh's one Redis-failure
policy, meshkit/redis_failure.py): lookups are misses and stores are skipped
without a call, so a hung Redis costs one lookup its timeout, not every lookup.
A lookup cut short by the caller's own, shorter timeout (the cache hop's
budget) is a miss, but no failure of Redis. Invalidation and stats are admin
calls: they are always tried, and raise ``Unavailable`` instead.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
from nlpmesh.cache.v1 import cache_pb2
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from meshkit import span_names
from meshkit.errors import Unavailable
from meshkit.redis_connect import is_cluster_client, redis_from_url
from meshkit.redis_failure import REDIS_FAILURES, RedisBackoff, describe_failure
from meshkit.tracing.provider import tracer
from promptcache import metrics
from promptcache.keys import PromptCacheKey, TemplatePrompt, check_prefix, model_index, template_index, tenant_tag

log = logging.getLogger("nlpmesh.cache")
_tracer = tracer("cache")

ADMIN_TIMEOUT_S = 5.0
WARN_EVERY_S = 10.0
# After a lookup or store failed: Redis skipped this long. Short, because a miss costs a generation.
COOLDOWN_S = 1.0
# On a Redis Cluster: shards of the stats hash, and the most hit/miss counts in flight at once.
STATS_SHARDS = 16
MAX_PENDING_COUNTS = 1024

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
        cooldown_s: float = COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``clock`` (monotonic seconds) times the cooldown after a failure."""
        self.redis = redis
        self.prefix = check_prefix(prefix)
        self.cluster = is_cluster_client(redis)
        self._stats_keys = ([f"{prefix}:stats:{{s{n}}}" for n in range(STATS_SHARDS)] if self.cluster
                            else [f"{prefix}:stats"])
        self._counting: set[asyncio.Task] = set()
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.max_answer_bytes = max_answer_bytes
        self._lookup_script = redis.register_script(_LOOKUP_LUA)
        self._warnings = _WarningThrottle(WARN_EVERY_S)
        self._backoff = RedisBackoff(cooldown_s, clock)

    async def lookup(self, key: PromptCacheKey, timeout_s: float | None = None) -> CachedAnswer | None:
        """The answer or None; slower than ``timeout_s`` (at most the cache's own) is a miss."""
        with _tracer.start_as_current_span(span_names.REDIS_LOOKUP) as span:
            answer = await self._lookup(key, self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s))
            span.set_attribute(span_names.CACHE_HIT, answer is not None)
            return answer

    async def _lookup(self, key: PromptCacheKey, timeout_s: float) -> CachedAnswer | None:
        entry = key.redis_key(self.prefix)
        if not self._backoff.may_read():
            metrics.record_miss("error")
            return None
        try:
            if self.cluster:  # the entry and the stats live in different slots: no script over both
                raw = await self._bounded(self.redis.get(entry), timeout_s)
            else:
                raw = await self._bounded(self._lookup_script(keys=[entry, self._stats_key(entry)]), timeout_s)
        except asyncio.CancelledError:  # the caller's budget ran out mid-lookup
            metrics.record_miss("cancelled")
            raise
        except TimeoutError as error:
            metrics.record_miss_for(error)
            if timeout_s >= self.timeout_s:  # else the caller's budget ran out, not Redis
                self._failed("prompt cache lookup timed out, treating as a miss", error)
            return None
        except Exception as error:  # any failure of the cache is a miss
            metrics.record_miss_for(error)
            self._failed("prompt cache lookup failed, treating as a miss", error)
            return None
        self._backoff.answered()
        if raw is None:
            metrics.record_miss("absent")
            self._count_soon(entry, "misses")
            return None
        try:
            answer = CachedAnswer.from_json(raw)
        except (ValueError, TypeError) as error:
            metrics.record_miss("corrupt")
            self._warnings.warn("corrupt prompt cache entry, treating as a miss", error)
            if self.cluster:
                self._count_soon(entry, "misses")
            else:
                await self._recount_as_miss(entry)
            return None
        metrics.record_hit("redis")
        self._count_soon(entry, "hits")
        return answer

    async def store(self, key: PromptCacheKey, answer: CachedAnswer, ttl_s: int | None = None) -> bool:
        """Stores a deterministic answer; False if not stored (never raises)."""
        with _tracer.start_as_current_span(span_names.REDIS_STORE):
            return await self._store(key, answer, ttl_s)

    async def _store(self, key: PromptCacheKey, answer: CachedAnswer, ttl_s: int | None) -> bool:
        if not key.sampling.cacheable:
            metrics.record_store("skipped")
            return False
        payload = answer.to_json()
        if len(payload.encode("utf-8")) > self.max_answer_bytes:
            metrics.record_store("skipped")
            log.warning("prompt cache: answer over %d bytes not stored", self.max_answer_bytes)
            return False
        ttl = ttl_s if ttl_s and ttl_s > 0 else self.ttl_s
        if not self._backoff.may_write():
            metrics.record_store("failed")
            return False
        try:
            await self._bounded(self._store_transaction(key, payload, ttl))
        except Exception as error:
            metrics.record_store("failed")
            self._failed("prompt cache store failed", error)
            return False
        self._backoff.answered()
        metrics.record_store("stored")
        return True

    async def invalidate_template(self, template_id: str, tenant: str | None = None) -> int:
        removed = await self._invalidate(lambda tag: template_index(self.prefix, tag, template_id), tenant)
        metrics.record_invalidation("template", removed)
        return removed

    async def invalidate_model(self, model: str, tenant: str | None = None) -> int:
        removed = await self._invalidate(lambda tag: model_index(self.prefix, tag, model), tenant)
        metrics.record_invalidation("model", removed)
        return removed

    async def stats(self) -> CacheStats:
        read = self.redis.pipeline(transaction=False)
        for stats_key in self._stats_keys:
            read.hmget(stats_key, ["hits", "misses", "stores"])
        shards = await self._admin(read.execute())
        hits, misses, stores = (sum(int(shard[i] or 0) for shard in shards) for i in range(3))
        return CacheStats(hits=hits, misses=misses, stores=stores)

    async def add_hits(self, count: int) -> bool:
        """Counts hits served elsewhere (the near tier); False if Redis didn't take them."""
        stats_key = self._stats_keys[int(time.monotonic_ns()) % len(self._stats_keys)]
        if not self._backoff.may_write():
            return False
        try:
            await self._bounded(self.redis.hincrby(stats_key, "hits", count), max(self.timeout_s, 1.0))
        except Exception as error:
            self._failed("prompt cache stats update failed", error)
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
        if self._counting:  # counts of the last lookups (a cluster's), bounded by their own timeout
            await asyncio.gather(*self._counting, return_exceptions=True)
        await self.redis.aclose()

    def _stats_key(self, entry: str) -> str:
        """The stats hash (shard) that counts lookups and stores of ``entry``."""
        return self._stats_keys[zlib.crc32(entry.encode()) % len(self._stats_keys)]

    def _count_soon(self, entry: str, field: str) -> None:
        """On a cluster: counts a lookup's hit or miss in the background (the script does it elsewhere)."""
        if not self.cluster:
            return
        if len(self._counting) >= MAX_PENDING_COUNTS:  # Redis is slower than lookups come: drop the count
            return
        task = asyncio.get_running_loop().create_task(self._count(self._stats_key(entry), field))
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    async def _count(self, stats_key: str, field: str) -> None:
        if not self._backoff.may_write():
            return
        try:
            await self._bounded(self.redis.hincrby(stats_key, field, 1), max(self.timeout_s, 1.0))
        except Exception as error:
            self._failed("prompt cache stats update failed", error)

    @property
    def _tenants_key(self) -> str:
        return f"{self.prefix}:tenants"

    async def _store_transaction(self, key: PromptCacheKey, payload: str, ttl: int) -> None:
        tag = tenant_tag(key.tenant)
        entry = key.redis_key(self.prefix)
        now = time.time()

        def in_entry_slot(pipe) -> None:  # the answer and its template's index: one hash tag
            pipe.set(entry, payload, ex=ttl)
            if isinstance(key.prompt, TemplatePrompt):
                _index_add(pipe, template_index(self.prefix, tag, key.prompt.id), entry, now, ttl)

        def elsewhere(pipe) -> None:
            _index_add(pipe, model_index(self.prefix, tag, key.model), entry, now, ttl)
            _index_add(pipe, self._tenants_key, tag, now, ttl)
            pipe.hincrby(self._stats_key(entry), "stores", 1)

        if self.cluster:
            # Indexes first: an answer is never findable by a lookup before an invalidation can find it.
            indexes = self.redis.pipeline(transaction=False)
            elsewhere(indexes)
            await indexes.execute()
            answer = self.redis.pipeline(transaction=True)
            in_entry_slot(answer)
            await answer.execute()
            return
        pipe = self.redis.pipeline(transaction=True)
        in_entry_slot(pipe)
        elsewhere(pipe)
        await pipe.execute()

    async def _invalidate(self, index_of: Callable[[str], str], tenant: str | None) -> int:
        with _tracer.start_as_current_span(span_names.REDIS_INVALIDATE) as span:
            removed = await self._remove_indexed(index_of, tenant)
            span.set_attribute(span_names.CACHE_REMOVED, removed)
            return removed

    async def _remove_indexed(self, index_of: Callable[[str], str], tenant: str | None) -> int:
        """Deletes the entries named by ``index_of(tenant tag)`` for the tenant, or every tenant."""
        if tenant is not None:
            tags = [tenant_tag(tenant)]
        else:
            tags = [t.decode() for t in await self._admin(self.redis.zrange(self._tenants_key, 0, -1))]
        indexes = [index_of(tag) for tag in tags]
        read = self.redis.pipeline(transaction=False)
        for index in indexes:
            read.zrange(index, 0, -1)
        members_per_index = await self._admin(read.execute())
        found = [(index, members) for index, members in zip(indexes, members_per_index) if members]
        removed = await (self._remove_in_slots(found) if self.cluster else self._remove_at_once(found))
        await self._announce_invalidation()
        return removed

    async def _remove_at_once(self, found: list[tuple[str, list[bytes]]]) -> int:
        # ZREM what was read rather than DEL the index: a store racing with
        # this call keeps its index entry.
        if not found:
            return 0
        write = self.redis.pipeline(transaction=True)
        for index, members in found:
            write.delete(*members)
            write.zrem(index, *members)
        results = await self._admin(write.execute())
        return sum(results[0::2])

    async def _remove_in_slots(self, found: list[tuple[str, list[bytes]]]) -> int:
        """On a cluster (no transaction spans slots): the index entries first, then one DEL per slot.

        In that order a store racing with the invalidation can only lose its answer (a ZADD and
        SET between the two steps, the SET then deleted: a miss, recomputed). The other order
        could leave a live answer no index names, which no later invalidation would find. A DEL
        that fails puts the index entries back (best effort) before the error is raised.
        """
        if not found:
            return 0
        unindex = self.redis.pipeline(transaction=False)
        for index, members in found:
            unindex.zrem(index, *members)
        await self._admin(unindex.execute())
        by_slot: dict[int, list[bytes]] = defaultdict(list)
        for _, members in found:
            for member in members:
                by_slot[key_slot(member)].append(member)
        deletes = self.redis.pipeline(transaction=False)
        for members in by_slot.values():
            deletes.delete(*members)
        try:
            return sum(await self._admin(deletes.execute()))
        except Exception:
            reindex = self.redis.pipeline(transaction=False)
            now = time.time()
            for index, members in found:
                reindex.zadd(index, dict.fromkeys(members, now + self.ttl_s))
            with contextlib.suppress(Exception):
                await self._admin(reindex.execute())
            raise

    @property
    def invalidations_channel(self) -> str:
        """Every invalidation is announced here, so near tiers (near.py) drop their copies."""
        return f"{self.prefix}:invalidations"

    async def _announce_invalidation(self) -> None:
        await self._admin(self.redis.publish(self.invalidations_channel, b"1"))

    async def _recount_as_miss(self, entry: str) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(self._stats_key(entry), "hits", -1)
            pipe.hincrby(self._stats_key(entry), "misses", 1)
            await self._bounded(pipe.execute())
        except Exception as error:
            self._failed("prompt cache stats update failed", error)

    async def _bounded(self, call, timeout_s: float | None = None):
        return await asyncio.wait_for(call, timeout_s or self.timeout_s)

    async def _admin(self, call):
        try:
            return await asyncio.wait_for(call, ADMIN_TIMEOUT_S)
        except REDIS_FAILURES as error:
            log.warning("prompt cache admin call failed: %s", describe_failure(error))
            raise Unavailable("the prompt cache's Redis is unavailable") from None

    def _failed(self, message: str, error: BaseException) -> None:
        """A lookup, store or count failed: Redis cools down, and the failure is logged (rate-limited)."""
        self._backoff.failed(error)
        self._warnings.warn(message, error)


def _index_add(pipe, index: str, member: str, now: float, ttl: int) -> None:
    """Adds a member scored by its expiry, drops expired ones, stretches the index TTL."""
    pipe.zadd(index, {member: now + ttl})
    pipe.zremrangebyscore(index, "-inf", now)
    pipe.expire(index, ttl, nx=True)
    pipe.expire(index, ttl, gt=True)


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
        log.warning("%s: %s%s", message, describe_failure(error), more)
        self._last, self._suppressed = now, 0
