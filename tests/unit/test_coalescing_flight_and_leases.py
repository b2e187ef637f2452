"""Request coalescing's parts on plain objects: the replay buffer, and the cross-replica lease or wait
(gateway/coalescing_replicas.py) over fake leases."""
from __future__ import annotations

import asyncio
import time

from gateway.coalescing import Flight
from gateway.coalescing_replicas import HeldLease, LeaseTimes, ReplicaCoalescing
from gateway.inference_stream import TokenDelta
from meshkit.sampling import Sampling
from promptcache.keys import ChatPrompt, PromptCacheKey
from promptcache.redis_tier import CachedAnswer

KEY = PromptCacheKey("acme", "smollm2", "r1", ChatPrompt((("user", "hi"),)), Sampling(4))
ANSWER = CachedAnswer("Hello", 2, 5, 1, "smollm2")
QUICK = LeaseTimes(ttl_s=0.3, wait_s=5.0, poll_s=0.01)


class FakeLeases:
    """Leases as another replica holds them: ``holder`` (None = free), ``stored`` after ``store_after`` reads."""

    def __init__(self, holder: str | None = "other", store_after: int | None = None, failing: bool = False):
        self.holder, self.store_after, self.failing = holder, store_after, failing
        self.reads = 0
        self.renewed = 0

    async def acquire(self, key, token, ttl_ms):
        if self.failing:
            return None
        if self.holder is None:
            self.holder = token
            return True
        return False

    async def renew(self, key, token, ttl_ms):
        self.renewed += 1
        return self.holder == token

    async def release(self, key, token):
        if self.holder == token:
            self.holder = None

    async def held(self, key):
        return None if self.failing else self.holder is not None

    async def stored_answer(self, key):
        self.reads += 1
        return ANSWER if self.store_after is not None and self.reads > self.store_after else None


class FakeBudget:
    def __init__(self, left_ms: float):
        self._ends = time.monotonic() + left_ms / 1000

    def left_ms(self) -> float:
        return (self._ends - time.monotonic()) * 1000


class FakeSpan:
    def __init__(self):
        self.attributes = {}

    def set_attribute(self, key, value):
        self.attributes[key] = value


class FakeScope:
    def __init__(self, left_ms: float = 10_000):
        self.budget, self.span, self.coalesced = FakeBudget(left_ms), FakeSpan(), []

    def record_coalesced(self, begun, ended):
        self.coalesced.append(ended - begun)


def test_a_late_subscriber_replays_every_delta_from_the_first():
    async def scenario():
        flight = Flight("k")
        flight.publish(TokenDelta("a"))
        flight.publish(TokenDelta("b"))
        late = asyncio.ensure_future(_collect(flight.replay()))
        await asyncio.sleep(0)
        flight.publish(TokenDelta("c"))
        flight.end()
        return await late

    assert asyncio.run(scenario()) == ["a", "b", "c"]


def test_a_replay_wait_past_its_time_is_a_timeout():
    async def scenario():
        flight = Flight("k")
        began = time.monotonic()
        try:
            await _collect(flight.replay(within_s=0.05))
        except TimeoutError:
            return time.monotonic() - began
        return None

    waited = asyncio.run(scenario())
    assert waited is not None and waited < 1.0


def test_a_free_lease_is_taken_and_renewed_until_released():
    async def scenario():
        leases = FakeLeases(holder=None)
        held = await ReplicaCoalescing(leases, QUICK).lead_or_wait(KEY, FakeScope(), may_wait=True)
        await asyncio.sleep(0.25)
        await held.release()
        return held, leases

    held, leases = asyncio.run(scenario())
    assert isinstance(held, HeldLease)
    assert leases.renewed >= 1 and leases.holder is None


def test_a_lease_held_elsewhere_waits_for_the_answer_stored_there():
    async def scenario():
        scope = FakeScope()
        found = await ReplicaCoalescing(FakeLeases(store_after=3), QUICK).lead_or_wait(KEY, scope, may_wait=True)
        return found, scope

    found, scope = asyncio.run(scenario())
    assert found == ANSWER
    assert len(scope.coalesced) == 1 and scope.span.attributes["nlpmesh.coalesced"] == "stored"


def test_a_lease_that_lapses_without_an_answer_is_taken_here():
    async def scenario():
        leases = FakeLeases()
        waiting = asyncio.ensure_future(ReplicaCoalescing(leases, QUICK).lead_or_wait(KEY, FakeScope(), True))
        await asyncio.sleep(0.05)
        leases.holder = None  # the other replica died: its lease expired
        return await asyncio.wait_for(waiting, 2.0)

    assert isinstance(asyncio.run(scenario()), HeldLease)


def test_a_refresh_never_waits_for_another_replicas_answer():
    found = asyncio.run(ReplicaCoalescing(FakeLeases(store_after=0), QUICK).lead_or_wait(KEY, FakeScope(), False))
    assert found is None


def test_redis_failing_means_generating_without_a_lease():
    found = asyncio.run(ReplicaCoalescing(FakeLeases(failing=True), QUICK).lead_or_wait(KEY, FakeScope(), True))
    assert found is None


def test_a_wait_is_bounded_by_the_callers_budget():
    async def scenario():
        began = time.monotonic()
        found = await ReplicaCoalescing(FakeLeases(), QUICK).lead_or_wait(KEY, FakeScope(left_ms=100), True)
        return found, time.monotonic() - began

    found, waited = asyncio.run(scenario())
    assert found is None and waited < 1.0


async def _collect(deltas) -> list[str]:
    return [delta.text async for delta in deltas]
