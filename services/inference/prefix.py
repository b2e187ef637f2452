"""Prefix KV reuse: blocks of KV state keyed by the token prefix, in two tiers.

A prompt is cut into blocks of ``block_tokens`` tokens. Block ``j``'s key is a
chained sha256 over the model, its revision, the tenant and every token up to
the end of block ``j``, so equal keys mean equal prefixes, and one tenant's
blocks never match another's (the tenant is hashed in, and never appears in a
key name). A block holds that block's KV for all layers:
``(2, layers, kv_heads, block_tokens, head_dim)`` in the model's dtype.

- ``local``: an LRU bounded in bytes, in this process.
- ``redis``: shared by all replicas, with a TTL. Reads take at most
  ``budget_s``; an error or a timeout counts as a miss and keeps Redis out of
  the path for ``cooldown_s``, so a slow or dead Redis costs a request at most
  its budget. Writes go out on a background thread, off the decode loop; a
  write Redis refuses (out of memory under ``noeviction``) pauses writes only.
  That cooldown is the mesh's one Redis-failure policy (meshkit/redis_failure.py).

Admission to Redis: a block is written there only once it has been seen
``min_sightings`` times (1 or 2). Most prompts are one-offs whose blocks would
only push reusable ones out of a bounded Redis; the blocks seen twice are the
shared heads (system prompts, templates) that replicas reuse. A block counts
its sightings on this replica while the local tier holds it; a sighting on
another replica (or one this replica has forgotten) is a small marker key in
Redis, set with ``SET NX`` by a block's first offer, so a prompt sent once to
each of two replicas is written by the second. Any key may be evicted: a
missing block or marker is a miss or one more sighting needed, never an error.

``match`` finds the longest run of cached blocks from the start (local first,
then one Redis round trip for the rest); at least one prompt token is always
left to prefill, because the first generated token needs its logits.

Redis Cluster (a ``redis+cluster://`` URL): that round trip is one MGET, so all
the blocks of a chain must share a slot. A block's key starts with
``CHAIN_TAG_BYTES`` of its chain's first block key, which is the Redis key's hash
tag: ``<prefix>:{<chain tag>}:<block>`` (and ``<prefix>:seen:{<chain tag>}:<block>``
for its marker). Prompts that share their first block (a system prompt, a
template's head) share a slot, which is what the MGET needs; prompts with
other heads spread over the masters.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
import torch
from cachetools import LRUCache
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from meshkit.redis_connect import check_redis_url, is_cluster_url, redis_from_url
from meshkit.redis_failure import REDIS_FAILURES, REFUSED, RedisBackoff, describe_failure, failure_category
from services.inference import metrics

log = logging.getLogger("nlpmesh.inference.prefix")

KEY_FORMAT = 1  # bump when the block layout changes: old entries stop matching
# A block key is this many bytes of its chain's first block key (the Redis hash tag), then its own digest.
CHAIN_TAG_BYTES = 8


@dataclass(frozen=True)
class PrefixMatch:
    tokens: int  # prompt tokens covered by ``kv`` (a multiple of the block size)
    kv: torch.Tensor | None  # (2, layers, kv_heads, tokens, head_dim), None when tokens == 0


NO_MATCH = PrefixMatch(0, None)


class _Block:
    __slots__ = ("in_redis", "kv", "sightings")

    def __init__(self, kv: torch.Tensor, in_redis: bool):
        self.kv = kv
        # Known to be in Redis: no need to write it again. Set by the writer
        # thread once written; a stale False only costs a duplicate write.
        self.in_redis = in_redis
        self.sightings = 1  # prompts that held it on this replica while the local tier kept it


Outgoing = Sequence[tuple[bytes, torch.Tensor]]  # (key, block KV), encoded on the writer thread


class RedisBlocks:
    """The Redis tier: raw block bytes under ``<prefix>:{<hex tag>}:<hex rest>``, with a TTL,
    where the tag is a key's first ``CHAIN_TAG_BYTES`` (its chain's: see ``PrefixCache.keys``).

    A block's first sighting leaves an empty marker ``<prefix>:seen:{<hex tag>}:<hex rest>``
    for ``seen_ttl_s`` instead (see ``put``). The client is redis-py's cluster
    client for a ``redis+cluster://`` URL; one MGET or pipeline then names keys
    of one chain, in one slot.
    """

    def __init__(self, url: str, *, budget_s: float = 0.05, ttl_s: int = 3600, cooldown_s: float = 5.0,
                 key_prefix: str = "nlpmesh:kv", seen_ttl_s: int = 600, clock: Callable[[], float] = time.monotonic,
                 client: redis.Redis | RedisCluster | None = None):
        """``clock`` (monotonic seconds) times the cooldown after a failure; ``client``: one made
        elsewhere (a test's fake), else one is made from ``url``."""
        check_redis_url(url)  # a bad URL stops the process at start
        self._url = url
        self._budget_s = budget_s
        self._client_lock = threading.Lock()
        # A cluster client connects when built (to learn the slots): built on first use, so a cluster
        # that is down at start is a miss and a cooldown, as a single Redis is.
        self._client: redis.Redis | RedisCluster | None = (
            client if client is not None or is_cluster_url(url) else self._connect())
        self._ttl_s = ttl_s
        self._seen_ttl_s = seen_ttl_s
        self._backoff = RedisBackoff(cooldown_s, clock)
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError(f"a Redis key prefix may not hold {{ or }}: {key_prefix!r}")
        self._prefix = key_prefix
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefix-redis-writer")

    @property
    def cooling_down(self) -> bool:
        """True for cooldown_s after a failure: Redis is skipped meanwhile."""
        return not self._backoff.may_read()

    @property
    def writable(self) -> bool:
        """False while cooling down, or for cooldown_s after Redis refused a write."""
        return self._backoff.may_write()

    def get(self, keys: list[bytes]) -> list[bytes | None] | None:
        """The values (None where absent); None when Redis failed or is cooling down."""
        if self.cooling_down:
            return None
        try:
            return self._redis().mget([self._name(key) for key in keys])
        except REDIS_FAILURES as error:
            self._failed("read", error)
            return None

    def put(self, items: Outgoing, *, if_seen: Outgoing = ()) -> concurrent.futures.Future:
        """Writes ``items``, and those of ``if_seen`` whose marker says they were seen before.

        The rest of ``if_seen`` get a marker now. The future's result: the keys written.
        """
        return self._writer.submit(self._put, items, if_seen)

    def flush(self) -> None:
        """Waits for the writes queued so far."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._client is not None:
            self._client.close()

    def _connect(self) -> redis.Redis | RedisCluster:
        # No retries on a cluster (redis-py's default retries with backoff): a slow read is a miss.
        retry = {"retry": Retry(NoBackoff(), retries=0)} if is_cluster_url(self._url) else {}
        return redis_from_url(redis.Redis, self._url, socket_timeout=self._budget_s,
                              socket_connect_timeout=self._budget_s, **retry)

    def _redis(self) -> redis.Redis | RedisCluster:
        with self._client_lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _put(self, items: Outgoing, if_seen: Outgoing) -> list[bytes]:
        if not self.writable:
            return []
        try:
            items = list(items) + self._seen_before(if_seen)
            if items:
                with self._redis().pipeline(transaction=False) as pipe:
                    for key, kv in items:
                        pipe.set(self._name(key), _encode(kv), ex=self._ttl_s)
                    pipe.execute()
        except REDIS_FAILURES as error:
            self._failed("write", error)
            return []
        return [key for key, _ in items]

    def _seen_before(self, blocks: Outgoing) -> list[tuple[bytes, torch.Tensor]]:
        """The blocks whose marker was already there; the others get one (one round trip)."""
        if not blocks:
            return []
        with self._redis().pipeline(transaction=False) as pipe:
            for key, _ in blocks:
                pipe.set(self._seen_name(key), b"", nx=True, ex=self._seen_ttl_s)
            first_sighting = pipe.execute()  # True: set now; None: already there
        return [block for block, first in zip(blocks, first_sighting) if not first]

    def _name(self, key: bytes) -> str:
        return block_name(self._prefix, key)

    def _seen_name(self, key: bytes) -> str:
        return f"{self._prefix}:seen:{_tagged(key)}"

    def _failed(self, what: str, error: Exception) -> None:
        if not self._backoff.failed(error):  # once per cooldown, not once per request
            return
        # Redis refused (out of memory, say): reads still work.
        skipped = "writes" if failure_category(error) == REFUSED else "Redis"
        log.warning("prefix KV %s failed: %s; %s skipped for %.0f s", what, describe_failure(error), skipped,
                    self._backoff.cooldown_s)


class PrefixCache:
    """Both tiers, used by the engine's worker thread only (the LRU takes no lock)."""

    def __init__(
        self,
        *,
        model: str,
        revision: str,
        block_tokens: int = 4,
        local_bytes: int = 256 * 1024 * 1024,
        shared: RedisBlocks | None = None,
        redis_min_sightings: int = 2,
    ):
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        if redis_min_sightings not in (1, 2):  # a marker records one earlier sighting, not a count
            raise ValueError("redis_min_sightings must be 1 or 2")
        self.block_tokens = block_tokens
        self._min_sightings = redis_min_sightings
        self._root = hashlib.sha256(f"nlpmesh-kv/{KEY_FORMAT}\0{model}\0{revision}".encode()).digest()
        self._local: LRUCache[bytes, _Block] = LRUCache(maxsize=max(local_bytes, 1), getsizeof=_block_bytes)
        self._redis_blocks = shared
        self._block_shape: tuple[int, ...] = ()
        self._dtype = torch.float32
        self._block_nbytes = 0

    def keys(self, tenant: str, token_ids: list[int]) -> list[bytes]:
        """The keys of the prompt's full blocks that may be reused (never its last token).

        A key is the chain's tag (the first block's digest, cut to ``CHAIN_TAG_BYTES``)
        and then the block's own chained digest, so one chain's keys share a Redis Cluster slot.
        """
        count = (len(token_ids) - 1) // self.block_tokens
        digest = hashlib.sha256(self._root + b"\0tenant\0" + tenant.encode()).digest()
        keys = []
        chain = b""
        for index in range(count):
            block = token_ids[index * self.block_tokens : (index + 1) * self.block_tokens]
            digest = hashlib.sha256(digest + struct.pack(f"<{len(block)}I", *block)).digest()
            chain = chain or digest[:CHAIN_TAG_BYTES]
            keys.append(chain + digest)
        return keys

    def match(self, keys: list[bytes]) -> PrefixMatch:
        if not keys:
            return NO_MATCH
        blocks: list[torch.Tensor] = []
        for key in keys:
            block = self._local.get(key)
            if block is None:
                break
            blocks.append(block.kv)
        local = len(blocks)
        metrics.PREFIX_LOOKUPS.labels("local", "hit" if local else "miss").inc()
        fetched = self._fetch(keys[local:]) if local < len(keys) else []
        blocks += fetched
        if not blocks:
            return NO_MATCH
        kv = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=3)
        metrics.PREFIX_TOKENS_REUSED.labels("local").inc(local * self.block_tokens)
        metrics.PREFIX_TOKENS_REUSED.labels("redis").inc(len(fetched) * self.block_tokens)
        return PrefixMatch(len(blocks) * self.block_tokens, kv)

    def remember(self, keys: list[bytes], known: int, read: Callable[[int, int], torch.Tensor]) -> None:
        """Keeps the prompt's blocks from ``known`` on; ``read(start, end)`` copies their KV.

        Each block held already counts one more sighting. Blocks seen
        ``min_sightings`` times and not yet in Redis (first seen here, or made
        while Redis was down) go there now; a block seen once goes there only if
        its marker says another sighting came first.
        """
        sure: list[tuple[bytes, _Block]] = []
        if_seen: list[tuple[bytes, _Block]] = []
        share = self._redis_blocks is not None and self._redis_blocks.writable
        new = [index for index in range(known, len(keys)) if keys[index] not in self._local]
        span = read(new[0] * self.block_tokens, (new[-1] + 1) * self.block_tokens) if new else None  # one copy
        for index, key in enumerate(keys):
            block = self._local.get(key)
            if block is None:
                if span is None or not new[0] <= index <= new[-1]:  # evicted meanwhile: nothing to add
                    continue
                first = (index - new[0]) * self.block_tokens
                block = _Block(span[:, :, :, first : first + self.block_tokens].clone(), in_redis=False)
                self._local[key] = block
            else:
                block.sightings += 1
            if share and not block.in_redis:
                (sure if block.sightings >= self._min_sightings else if_seen).append((key, block))
        if sure or if_seen:
            written = self._redis_blocks.put([(key, block.kv) for key, block in sure],
                                       if_seen=[(key, block.kv) for key, block in if_seen])
            written.add_done_callback(functools.partial(_mark_in_redis, dict(sure + if_seen)))

    @property
    def local_bytes(self) -> int:
        """Bytes held by the in-process tier."""
        return int(self._local.currsize)

    def close(self) -> None:
        if self._redis_blocks is not None:
            self._redis_blocks.close()

    def _fetch(self, keys: list[bytes]) -> list[torch.Tensor]:
        """The longest run of ``keys`` found in Redis, from the first; each one kept locally too."""
        if self._redis_blocks is None:
            return []
        values = self._redis_blocks.get(keys)
        if values is None:
            metrics.PREFIX_LOOKUPS.labels("redis", "error").inc()
            return []
        blocks = []
        for key, value in zip(keys, values):
            kv = None if value is None else self._decode(value)
            if kv is None:
                break
            self._local[key] = _Block(kv, in_redis=True)
            blocks.append(kv)
        metrics.PREFIX_LOOKUPS.labels("redis", "hit" if blocks else "miss").inc()
        return blocks

    def configure(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, computed_by: str = "") -> None:
        """The engine's KV layout, which blocks from Redis must have (called once, by the engine, before
        any lookup). ``computed_by`` names the kernels that compute the KV (device, precision): it salts
        every key, so replicas that would compute other bits (a CUDA one beside CPU ones, int8 beside
        float32) never share blocks, and a prefix hit gives the answer a cold prefill would."""
        if computed_by:
            self._root = hashlib.sha256(self._root + computed_by.encode()).digest()
        self._block_shape = (2, layers, kv_heads, self.block_tokens, head_dim)
        self._dtype = dtype
        self._block_nbytes = math.prod(self._block_shape) * dtype.itemsize

    def _decode(self, value: bytes) -> torch.Tensor | None:
        if len(value) != self._block_nbytes:  # another layout under the same key: treat as absent
            return None
        return torch.frombuffer(bytearray(value), dtype=self._dtype).view(self._block_shape)


def _mark_in_redis(blocks: dict[bytes, _Block], written: concurrent.futures.Future) -> None:
    """On the writer thread: the blocks now in Redis are not offered again."""
    if written.exception() is not None:  # a bug: Redis errors are caught in _put
        log.error("prefix KV write failed", exc_info=written.exception())
        return
    for key in written.result():
        blocks[key].in_redis = True


def block_name(prefix: str, key: bytes) -> str:
    """The Redis key of a block: ``<prefix>:{<chain tag hex>}:<rest hex>``."""
    return f"{prefix}:{_tagged(key)}"


def _tagged(key: bytes) -> str:
    """``{<hex of the chain tag>}:<hex of the rest>``: the braces make the tag a Redis Cluster hash tag."""
    return f"{{{key[:CHAIN_TAG_BYTES].hex()}}}:{key[CHAIN_TAG_BYTES:].hex()}"


def _encode(kv: torch.Tensor) -> bytes:
    return kv.contiguous().view(torch.uint8).numpy().tobytes()


def _block_bytes(block: _Block) -> int:
    return block.kv.nbytes
