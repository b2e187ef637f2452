"""The prompt cache's Prometheus metrics, in whichever process looks up or stores.

The gateway (near tier over Redis) and the cache service both record here;
each exports its own counts on its own /metrics. A lookup is counted once:
a near-tier hit as ``tier="near"``, else as a Redis hit or a miss with its reason.
"""
from __future__ import annotations

from prometheus_client import Counter
from redis.exceptions import TimeoutError as RedisTimeoutError

HITS = Counter("nlpmesh_cache_hits_total", "Prompt cache lookups answered, by the tier that answered.", ["tier"])
MISSES = Counter(
    "nlpmesh_cache_misses_total",
    "Prompt cache lookups that found no answer: absent, corrupt, or Redis failing (error, timeout, cancelled).",
    ["reason"],
)
STORES = Counter("nlpmesh_cache_stores_total", "Prompt cache store attempts, by result.", ["result"])
INVALIDATIONS = Counter("nlpmesh_cache_invalidations_total", "Invalidation calls, by scope.", ["scope"])
INVALIDATED_ENTRIES = Counter("nlpmesh_cache_invalidated_entries_total", "Entries removed by invalidations.")

MISS_REASONS = ("absent", "corrupt", "error", "timeout", "cancelled")
STORE_RESULTS = ("stored", "skipped", "failed")

# Children looked up once: the lookup path is the mesh's fastest.
_hits = {tier: HITS.labels(tier) for tier in ("near", "redis")}
_misses = {reason: MISSES.labels(reason) for reason in MISS_REASONS}
_stores = {result: STORES.labels(result) for result in STORE_RESULTS}


def record_hit(tier: str) -> None:
    _hits[tier].inc()


def record_miss(reason: str) -> None:
    _misses[reason].inc()


def record_miss_for(error: BaseException) -> None:
    """A lookup that failed: a timeout, or any other error of the cache."""
    record_miss("timeout" if isinstance(error, (TimeoutError, RedisTimeoutError)) else "error")


def record_store(result: str) -> None:
    _stores[result].inc()


def record_invalidation(scope: str, removed: int) -> None:
    INVALIDATIONS.labels(scope).inc()
    INVALIDATED_ENTRIES.inc(removed)
