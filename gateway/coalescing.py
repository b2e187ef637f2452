"""Request coalescing in one gateway: identical concurrent requests share one generation.

A request that may be coalesced (gateway/answer.py: deterministic sampling, not CACHE_MODE_BYPASS)
has a prompt-cache key: tenant, model id and revision, the prompt as called, sampling. The first
request with a key that has no generation in flight starts one, a ``Flight``; the generation runs in
a task of its own, under the first caller's scope, and every text delta goes into the flight's replay
buffer. A later request with the same key, while the flight runs, subscribes to it: it gets every
delta from the start, then the answer, and a ``coalesced`` hop in its timings for its wait.

The task, not a caller, owns the generation, so a caller that goes away (the first included) leaves
the others running; the generation is cancelled only when no caller is left. A flight that fails
hands its error to each caller still on it. A follower whose flight failed because of the first
caller (its budget ran out, or its generation was cancelled) tries once more on its own: it starts a
new flight, or joins one another follower started. Each follower's wait is bounded by its own budget.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import Counter

from gateway.hop import Hop
from gateway.inference_stream import TokenDelta
from gateway.scope import RequestScope
from meshkit import span_names
from meshkit.errors import DeadlineExceeded
from promptcache.keys import PromptCacheKey

log = logging.getLogger("nlpmesh.gateway")

# How a request was answered by a generation it did not start: its own flight's ("stream", this gateway)
# or one another gateway replica stored ("stored"). Both values also go on the request span.
SHARED_STREAM = "stream"
SHARED_STORED = "stored"
COALESCED = Counter("nlpmesh_gateway_coalesced_requests_total",
                    "Requests answered by a generation another identical request started, by how it was shared.",
                    ["shared"])
# Why a request that meant to share a generation made its own: the flight it joined failed
# ("leader_failed"), or another replica's lease lapsed or its answer did not come in time ("replica_gave_up").
COALESCING_FALLBACKS = Counter("nlpmesh_gateway_coalescing_fallbacks_total",
                               "Requests that meant to share a generation and made their own, by why.", ["reason"])
for _shared in (SHARED_STREAM, SHARED_STORED):
    COALESCED.labels(_shared)
for _reason in ("leader_failed", "replica_gave_up"):
    COALESCING_FALLBACKS.labels(_reason)


class Flight:
    """One generation in flight: its deltas so far (replayed to each subscriber), then its end."""

    def __init__(self, name: str):
        self.name = name  # its key's digest: every field of the key, the tenant included
        self.deltas: list[TokenDelta] = []
        self.final = None  # the first caller's Outcome, once the generation ends with an answer
        self.error: BaseException | None = None
        self.done = False
        self.subscribers = 0
        self.task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    def publish(self, event) -> None:
        if isinstance(event, TokenDelta):
            self.deltas.append(event)
        else:
            self.final = event
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        self.error, self.done = error, True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def replay(self, within_s: float | None = None) -> AsyncIterator[TokenDelta]:
        """Every delta from the first, as they come, until the flight ends; TimeoutError past ``within_s``.

        Only the waits are timed, never the caller's work between two deltas (it runs in the caller's task).
        """
        deadline = None if within_s is None else time.monotonic() + within_s
        sent = 0
        while True:
            changed = self._changed
            while sent < len(self.deltas):
                sent += 1
                yield self.deltas[sent - 1]
            if self.done:
                return
            if deadline is None:
                await changed.wait()
            else:
                await asyncio.wait_for(changed.wait(), max(deadline - time.monotonic(), 0.0))


class FollowerFallback(Exception):
    """The flight a follower joined ended through its first caller's fault: the follower tries on its own."""


class Coalescer:
    """The flights in flight in this gateway, by their prompt-cache key's digest."""

    def __init__(self):
        self._flights: dict[str, Flight] = {}

    async def stream(self, key: PromptCacheKey, scope: RequestScope,
                     lead: Callable[[RequestScope], AsyncIterator]) -> AsyncIterator:
        """The answer to ``key``: a flight's, joined, or one started with ``lead(scope)``.

        ``lead`` yields text deltas, then the answer (an ``Outcome`` with the caller's own timings).
        """
        name = key.digest()
        for attempt in (1, 2):
            flight = self._flights.get(name)
            if flight is None:
                flight = self._start(name, lead(scope))
                async with self._subscribed(flight):
                    async for event in self._as_leader(flight):
                        yield event
                return
            try:
                async with self._subscribed(flight):
                    async for event in self._as_follower(flight, scope, retry=attempt == 1):
                        yield event
                return
            except FollowerFallback:
                COALESCING_FALLBACKS.labels("leader_failed").inc()
                log.info("the generation this request shared ended early; it makes its own")

    def _start(self, name: str, events: AsyncIterator) -> Flight:
        flight = Flight(name)
        self._flights[name] = flight
        flight.task = asyncio.get_running_loop().create_task(self._run(flight, events))
        return flight

    async def _run(self, flight: Flight, events: AsyncIterator) -> None:
        error = None
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    flight.publish(event)
        except (Exception, asyncio.CancelledError) as caught:  # each subscriber gets it; none is left unretrieved
            error = caught
        finally:
            if self._flights.get(flight.name) is flight:
                del self._flights[flight.name]
            flight.end(error)

    @contextlib.asynccontextmanager
    async def _subscribed(self, flight: Flight):
        flight.subscribers += 1
        try:
            yield
        finally:
            flight.subscribers -= 1
            if flight.subscribers == 0 and not flight.done:  # nobody left to answer: stop generating
                if self._flights.get(flight.name) is flight:
                    del self._flights[flight.name]
                flight.task.cancel()

    async def _as_leader(self, flight: Flight) -> AsyncIterator:
        async for delta in flight.replay():
            yield delta
        if flight.error is not None:
            raise flight.error
        if flight.final is not None:
            yield flight.final

    async def _as_follower(self, flight: Flight, scope: RequestScope, retry: bool) -> AsyncIterator:
        begun = time.perf_counter()
        try:
            async for delta in flight.replay(within_s=max(scope.budget.left_ms(), 0.0) / 1000.0):
                yield delta
        except TimeoutError:
            raise DeadlineExceeded(f"the request's {scope.budget.total_ms:.0f} ms budget ran out while it waited "
                                   "for the generation it shares", hop=Hop.INFERENCE) from None
        if flight.final is None and retry and _first_callers_fault(flight.error):
            raise FollowerFallback
        if flight.error is not None and not isinstance(flight.error, asyncio.CancelledError):
            raise flight.error
        if flight.final is None:
            return  # the generation was cancelled under everyone: no answer, as for a lone caller
        scope.record_coalesced(begun, time.perf_counter())
        scope.span.set_attribute(span_names.COALESCED, SHARED_STREAM)
        COALESCED.labels(SHARED_STREAM).inc()
        yield dataclasses.replace(flight.final, timings=scope.finish())


def _first_callers_fault(error: BaseException | None) -> bool:
    """A flight's end that says nothing about a follower's chances: the first caller's budget ran out,
    or its generation was cancelled; any other error is the follower's too (the same status)."""
    return error is None or isinstance(error, (DeadlineExceeded, asyncio.CancelledError))
