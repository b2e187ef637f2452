"""Per-tenant quotas shared by every gateway replica through Redis.

    quotas = Quotas(redis, QuotaSettings(replicas=3))
    async with await quotas.admit(tenant) as lease:   # ResourceExhausted when over
        ...generate...
        await lease.record_tokens(completion_tokens)

Three limits (``TenantLimits``), checked together by one Lua script, so one
round trip admits a request, and nothing is counted when any limit refuses:

- ``requests_per_s``: a token bucket (GCRA) holding one second's worth of
  requests (at least one) and refilling continuously. One key, O(1), and the
  RetryInfo delay is exact.
- ``tokens_per_min``: generated tokens counted after each generation in a
  one-minute window that starts with the first tokens counted in it; a request
  is refused while the window is at or over the limit, until the window ends.
- ``max_streams``: a sorted set of stream ids scored by lease expiry. A
  replica renews its streams' leases every ``stream_lease_s / 3``; a crashed
  replica stops renewing and its streams stop counting after
  ``stream_lease_s``. A plain counter cannot tell a crashed replica's streams
  from a live one's, and a counter with a TTL would forget the live ones too.

Time is Redis's (``TIME`` inside the scripts), so replicas' clocks need not agree.

Redis key layout (``<ns>`` = ``<prefix>:t:{<tenant_tag>}``: the tenant's hash,
never its id, in a hash tag, so one tenant's keys share a Cluster slot):

    <ns>:rps      string: the bucket's theoretical arrival time (ms), PX TTL
    <ns>:tok      string: tokens generated in the current window, expires with it
    <ns>:streams  sorted set: stream id -> lease expiry (ms), PX TTL

Redis failing (refused, slow past ``timeout_s``, an error) is never an error
for the caller and never unlimited: for ``fallback_s`` this replica holds each
tenant to its local share (limit / ``replicas``, at least 1 where the limit is
at least 1), in process, then tries Redis again. That cooldown, and how a
failure is logged, is the mesh's one Redis-failure policy (meshkit/redis_failure.py);
every quota call writes, so a refused write falls back as much as a dead Redis. A tenant without limits costs
no Redis call at all.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from gateway.refusal_metrics import QUOTA_REFUSALS
from gateway.tenant import Tenant, TenantLimits
from meshkit.errors import QuotaViolation, ResourceExhausted
from meshkit.redis_failure import REDIS_FAILURES, RedisBackoff, describe_failure
from promptcache.keys import tenant_tag

log = logging.getLogger("nlpmesh.gateway.quotas")

REQUESTS_PER_S = "requests_per_s"
TOKENS_PER_MIN = "tokens_per_min"
MAX_STREAMS = "max_streams"
TOKEN_WINDOW_MS = 60_000
# When a stream ends is unknown; a caller refused for streams may try again soon.
STREAM_RETRY_S = 1.0

_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, token_limit, max_streams = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local refused = {}
local next_tat
if rate and rate <= 0 then
  table.insert(refused, 'requests_per_s'); table.insert(refused, 1000)
elseif rate then
  local interval = 1000 / rate
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
  next_tat = tat + interval
  local wait = next_tat - now - math.max(1, rate) * interval
  if wait > 0 then table.insert(refused, 'requests_per_s'); table.insert(refused, math.ceil(wait)) end
end
if token_limit then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= token_limit then
    table.insert(refused, 'tokens_per_min'); table.insert(refused, math.max(redis.call('PTTL', KEYS[2]), 1))
  end
end
if max_streams then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= max_streams then
    table.insert(refused, 'max_streams'); table.insert(refused, 0)
  end
end
if #refused > 0 then return refused end
if next_tat then
  redis.call('SET', KEYS[1], string.format('%.3f', next_tat), 'PX', math.ceil(next_tat - now) + 1)
end
if max_streams then
  local lease = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[3], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[3], lease)
end
return refused
"""

_RECORD_TOKENS_LUA = """
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return used
"""

# Re-adds a lease a Redis restart lost, so the streams it holds count again.
_RENEW_LUA = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], expiry, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""


@dataclass(frozen=True)
class QuotaSettings:
    key_prefix: str = "nlpmesh:q"
    timeout_s: float = 0.05  # one quota call's Redis round trip; slower is a Redis failure
    replicas: int = 1  # gateway replicas: Redis failing, each holds a tenant to limit / replicas
    fallback_s: float = 5.0  # after a Redis failure, local shares only, for this long
    warn_every_s: float = 30.0  # at most one warning about Redis per this long
    stream_lease_s: float = 30.0  # a stream not renewed for this long (crashed replica) stops counting

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError("quota replicas must be at least 1")
        if self.timeout_s <= 0 or self.stream_lease_s <= 0 or self.fallback_s < 0:
            raise ValueError("quota timeout and stream lease must be positive, fallback not negative")


class QuotaLease:
    """One request admitted within its tenant's quotas: it holds a stream (``max_streams``) and counts
    generated tokens. Release it when the request ends (``async with`` does)."""

    def __init__(self, quotas: Quotas | None, tenant: Tenant, stream_id: str | None):
        self._quotas = quotas
        self.tenant = tenant
        self._stream_id = stream_id

    async def record_tokens(self, n: int) -> None:
        """Counts ``n`` generated tokens against the tenant's tokens per minute."""
        if self._quotas is not None:
            await self._quotas.record_tokens(self.tenant, n)

    async def release(self) -> None:
        """Frees the request's stream; idempotent, never raises."""
        stream_id, self._stream_id = self._stream_id, None
        if stream_id is not None and self._quotas is not None:
            await self._quotas._release(self.tenant, stream_id)

    async def __aenter__(self) -> QuotaLease:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.release()


class Quotas:
    """Admits a tenant's requests within its limits, shared by every replica using the same Redis.

    ``clock`` (monotonic seconds) drives the local shares and the fallback period.
    """

    def __init__(self, redis: aioredis.Redis | None, settings: QuotaSettings = QuotaSettings(),
                 clock: Callable[[], float] = time.monotonic):
        """``redis`` None: no shared state, each replica holds every tenant to its local share."""
        self.redis = redis
        self.settings = settings
        self._clock = clock
        scripts = (_ADMIT_LUA, _RECORD_TOKENS_LUA, _RENEW_LUA)
        self._admit_script, self._record_script, self._renew_script = (
            (None,) * 3 if redis is None else (redis.register_script(script) for script in scripts))
        self._local: dict[str, _LocalShare] = {}
        self._held: dict[str, set[str]] = {}  # streams key -> ids this replica holds
        self._unreleased: dict[str, dict[str, float]] = {}  # streams key -> id -> give up at
        self._backoff = RedisBackoff(settings.fallback_s, clock)
        self._last_warning = -math.inf
        self._renewer: asyncio.Task | None = None

    async def admit(self, tenant: Tenant) -> QuotaLease:
        """A lease, or ResourceExhausted naming each limit over (QuotaFailure) and when to retry."""
        limits = tenant.limits
        if limits == TenantLimits():
            return QuotaLease(None, tenant, None)
        keys = _Keys(self.settings.key_prefix, tenant.id)
        stream_id = uuid.uuid4().hex if limits.max_streams is not None else None
        refused = await self._call_redis(self._admit_script, keys=keys.all, args=[
            _arg(limits.requests_per_s), _arg(limits.tokens_per_min), _arg(limits.max_streams),
            stream_id or "", int(self.settings.stream_lease_s * 1000)])
        local = _unanswered(refused)
        if local:
            over = self._local_share(keys, limits).admit(self._clock(), len(self._held.get(keys.streams, ())))
        else:
            over = {_text(name): wait_ms / 1000.0 for name, wait_ms in zip(refused[0::2], refused[1::2])}
        if over:
            if refused is _NO_ANSWER and stream_id is not None:  # a slow script may have added it
                self._release_later(keys.streams, [stream_id])
            raise _refusal(limits, over, local)
        if stream_id is not None:
            self._hold(keys.streams, stream_id)
        return QuotaLease(self, tenant, stream_id)

    async def record_tokens(self, tenant: Tenant, n: int) -> None:
        """Counts ``n`` generated tokens; never raises (Redis failing, they count locally)."""
        limit = tenant.limits.tokens_per_min
        if limit is None or n <= 0:
            return
        keys = _Keys(self.settings.key_prefix, tenant.id)
        recorded = await self._call_redis(self._record_script, keys=[keys.tokens], args=[n, TOKEN_WINDOW_MS])
        if _unanswered(recorded):
            self._local_share(keys, tenant.limits).record_tokens(self._clock(), n)

    async def warm_up(self) -> None:
        """Loads the scripts, so the first admission is a plain EVALSHA; Redis failing is only logged."""
        if self.redis is None:
            return
        for script in (self._admit_script, self._record_script, self._renew_script):
            if _unanswered(await self._call_redis(self.redis.script_load, script.script)):
                return

    async def close(self) -> None:
        """Stops renewing leases (the streams still held expire); does not close ``redis``."""
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None

    async def _release(self, tenant: Tenant, stream_id: str) -> None:
        keys = _Keys(self.settings.key_prefix, tenant.id)
        held = self._held.get(keys.streams)
        if held is not None:
            held.discard(stream_id)
            if not held:
                del self._held[keys.streams]
        if self.redis is None:
            return
        removed = await self._call_redis(self.redis.zrem, keys.streams, stream_id)
        if _unanswered(removed):  # on the next renewal, or the lease runs out
            self._release_later(keys.streams, [stream_id])

    async def _call_redis(self, call: Callable[..., Awaitable], /, *args, **kwargs):
        """The call's answer; _NO_ANSWER when it failed or ran past timeout_s (it may still
        have run); _NOT_CALLED, without a call, during the cooldown (fallback_s) after a failure."""
        if self.redis is None or not self._backoff.may_write():
            return _NOT_CALLED
        try:
            answer = await asyncio.wait_for(call(*args, **kwargs), self.settings.timeout_s)
        except REDIS_FAILURES as error:
            self._fall_back(error)
            return _NO_ANSWER
        if self._backoff.answered():
            log.info("quotas: Redis answers again; tenants are back on their shared quotas")
        return answer

    def _fall_back(self, error: BaseException) -> None:
        self._backoff.failed(error)
        now = self._clock()
        if now - self._last_warning >= self.settings.warn_every_s:
            self._last_warning = now
            log.warning("quotas: Redis failed (%s); each tenant held to this replica's share "
                        "(limit / %d) for %gs, then Redis again", describe_failure(error), self.settings.replicas,
                        self.settings.fallback_s)

    def _local_share(self, keys: _Keys, limits: TenantLimits) -> _LocalShare:
        share = self._local.get(keys.streams)
        if share is None or share.limits != limits:
            share = self._local[keys.streams] = _LocalShare(limits, self.settings.replicas)
        return share

    def _hold(self, streams_key: str, stream_id: str) -> None:
        self._held.setdefault(streams_key, set()).add(stream_id)
        self._start_renewer()

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())

    async def _renew_leases(self) -> None:
        """Every lease / 3, while this replica holds streams or owes releases."""
        while self._held or self._unreleased:
            await asyncio.sleep(self.settings.stream_lease_s / 3)
            await self._renew_once()

    async def _renew_once(self) -> None:
        now = self._clock()  # releases owed past a lease are moot: those leases ran out
        self._unreleased = {key: live for key, owed in self._unreleased.items()
                            if (live := {i: give_up_at for i, give_up_at in owed.items() if give_up_at > now})}
        lease_ms = int(self.settings.stream_lease_s * 1000)
        batch = {key: list(ids) for key, ids in self._held.items()}
        for key, ids in batch.items():
            if _unanswered(await self._call_redis(self._renew_script, keys=[key], args=[lease_ms, *ids])):
                return
        # A release whose ZREM overtook this renewal would leave its lease behind: drop it again.
        for key, ids in batch.items():
            self._release_later(key, [i for i in ids if i not in self._held.get(key, ())])
        for key in list(self._unreleased):
            owed = self._unreleased.pop(key)
            if _unanswered(await self._call_redis(self.redis.zrem, key, *owed)):
                self._unreleased.setdefault(key, {}).update(owed)

    def _release_later(self, key: str, ids: list[str]) -> None:
        """Stream ids whose release Redis did not take: sent again with the renewals, until their lease ends."""
        if ids:
            give_up_at = self._clock() + self.settings.stream_lease_s
            self._unreleased.setdefault(key, {}).update(dict.fromkeys(ids, give_up_at))
            self._start_renewer()


_NO_ANSWER = object()  # a Redis call failed or timed out (it may still have run)
_NOT_CALLED = object()  # no Redis, or Redis cooling down after a failure


def _unanswered(answer) -> bool:
    return answer is _NO_ANSWER or answer is _NOT_CALLED


@dataclass(frozen=True)
class _Keys:
    prefix: str
    tenant: str

    @property
    def _ns(self) -> str:
        return f"{self.prefix}:t:{{{tenant_tag(self.tenant)}}}"

    @property
    def rps(self) -> str:
        return f"{self._ns}:rps"

    @property
    def tokens(self) -> str:
        return f"{self._ns}:tok"

    @property
    def streams(self) -> str:
        return f"{self._ns}:streams"

    @property
    def all(self) -> list[str]:
        return [self.rps, self.tokens, self.streams]


@dataclass
class _LocalShare:
    """One tenant's share of its limits, enforced in this process while Redis fails."""

    limits: TenantLimits
    replicas: int
    rate: float | None = field(init=False)
    token_limit: int | None = field(init=False)
    max_streams: int | None = field(init=False)
    tat: float = -math.inf
    window_ends: float = -math.inf
    tokens_used: int = 0

    def __post_init__(self):
        self.rate = _share(self.limits.requests_per_s, self.replicas)
        self.token_limit = _int_share(self.limits.tokens_per_min, self.replicas)
        self.max_streams = _int_share(self.limits.max_streams, self.replicas)

    def admit(self, now: float, streams_held: int) -> dict[str, float]:
        """Like the Lua script: every limit over, with its wait in seconds; counts only if none is."""
        over: dict[str, float] = {}
        next_tat = None
        if self.rate is not None:
            if self.rate <= 0:
                over[REQUESTS_PER_S] = STREAM_RETRY_S
            else:
                interval = 1.0 / self.rate
                next_tat = max(self.tat, now) + interval
                wait = next_tat - now - max(1.0, self.rate) * interval
                if wait > 0:
                    over[REQUESTS_PER_S] = wait
        if self.token_limit is not None:
            if now >= self.window_ends:
                self.tokens_used = 0
            if self.tokens_used >= self.token_limit:
                over[TOKENS_PER_MIN] = max(self.window_ends - now, 0.001)
        if self.max_streams is not None and streams_held >= self.max_streams:
            over[MAX_STREAMS] = 0.0
        if not over and next_tat is not None:
            self.tat = next_tat
        return over

    def record_tokens(self, now: float, n: int) -> None:
        if now >= self.window_ends:
            self.window_ends, self.tokens_used = now + TOKEN_WINDOW_MS / 1000.0, 0
        self.tokens_used += n


def _share(limit: float | None, replicas: int) -> float | None:
    if limit is None:
        return None
    share = limit / replicas
    return max(share, 1.0) if limit >= 1 else share


def _int_share(limit: int | None, replicas: int) -> int | None:
    if limit is None:
        return None
    return max(limit // replicas, 1) if limit >= 1 else max(limit, 0)


def _refusal(limits: TenantLimits, over: dict[str, float], local: bool) -> ResourceExhausted:
    described = {
        REQUESTS_PER_S: lambda: f"over {limits.requests_per_s:g} requests per second",
        TOKENS_PER_MIN: lambda: f"{limits.tokens_per_min} generated tokens per minute used up",
        MAX_STREAMS: lambda: f"{limits.max_streams} requests in flight at once",
    }
    share = " (this replica's share while the shared quota is unreachable)" if local else ""
    violations = [QuotaViolation(f"tenant:{name}", described[name]() + share) for name in over]
    waits = [STREAM_RETRY_S if name == MAX_STREAMS else wait for name, wait in over.items()]
    names = ", ".join(over)
    for name in over:
        QUOTA_REFUSALS.labels(name).inc()
    return ResourceExhausted(f"tenant over its quota: {names}", retry_after_s=max(waits), violations=violations)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _arg(limit: float | None) -> str:
    return "" if limit is None else repr(limit)

