"""Capacity control ("admission control" in the settings and docs): a generation the inference
service cannot take is refused before any hop. Not the tenant's quota (gateway/quotas.py).

Under load the gateway used to accept every request and spend its template and
tokenizer hops on it, only for the request to wait in the inference queue, or
be refused there, or run out of time on the way while the CPU was saturated.
Instead, after a cache miss (a cache hit is always served) and before the
template hop, ``CapacityGate.generation()`` holds a place for a generation or raises
ResourceExhausted with RetryInfo and an ErrorInfo reason:

- ``GATEWAY_AT_CAPACITY``: this gateway already has as many generations in
  flight (admitted, not yet ended) as the inference service can hold, its
  ``capacity`` (max_running + max_queue, reported in the metadata of every
  Generate and ModelInfo: meshkit/wire.py), or as
  ``max_in_flight`` when that is set;
- ``INFERENCE_AT_CAPACITY``: the latest report, younger than ``full_hold_s``,
  said the inference service was full (other gateways fill it too). The next
  report, sent when any generation starts or ends, lifts it. A generation this
  gateway cancels (its caller went away) sends no end report: the place it
  frees is taken off the held report at once (``cancelled``), so a cancel does
  not leave new requests refused for ``full_hold_s``.

Before the first report, and with ``enabled`` off, every generation is admitted.

With several inference replicas (each names itself in its report), the gateway keeps
the latest report of each replica heard from in the last ``REPLICA_FORGET_S``: the
capacity is their sum, and ``INFERENCE_AT_CAPACITY`` needs every one of them to
have said it was full within ``full_hold_s``. One replica full, another with room:
admitted (the balancer sends it on).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gateway.refusal_metrics import ADMISSION_REFUSALS
from meshkit.errors import ResourceExhausted
from meshkit.wire import InferenceLoad

# A replica not heard from for this long no longer counts (it was stopped, or scaled away).
REPLICA_FORGET_S = 30.0


@dataclass(frozen=True)
class CapacitySettings:
    enabled: bool = True
    max_in_flight: int = 0  # this gateway's own ceiling on generations in flight; 0 = the reported capacity
    full_hold_s: float = 0.5  # how long a report of a full inference refuses, unless a newer one lifts it
    retry_after_s: float = 1.0  # the RetryInfo delay of a refusal


class CapacityGate:
    """The places for generations this gateway may hold in flight, from the inference replicas' load reports."""

    def __init__(self, settings: CapacitySettings, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._clock = clock
        self._loads: dict[str, tuple[InferenceLoad, float]] = {}  # per replica: its latest report, when
        self.in_flight = 0

    def observe(self, load: InferenceLoad | None) -> None:
        """Keeps each inference replica's latest report (None: the call carried none)."""
        if load is not None:
            self._loads[load.replica] = (load, self._clock())

    def _current(self) -> list[tuple[InferenceLoad, float]]:
        """The reports of the replicas heard from lately; the newest report always counts."""
        if not self._loads:
            return []
        now = self._clock()
        newest = max(self._loads.values(), key=lambda entry: entry[1])
        for replica, (_, seen_at) in list(self._loads.items()):
            if now - seen_at > REPLICA_FORGET_S:
                del self._loads[replica]
        return list(self._loads.values()) or [newest]

    def cancelled(self, replica: str) -> None:
        """One of this gateway's generations on ``replica`` was cancelled before the replica reported its end."""
        entry = self._loads.get(replica)
        if entry is not None and entry[0].active > 0:
            load, seen_at = entry
            self._loads[replica] = (InferenceLoad(load.active - 1, load.capacity, load.replica), seen_at)

    @property
    def limit(self) -> int | None:
        """How many generations this gateway may have in flight; None = unknown, so unlimited."""
        if self._settings.max_in_flight:
            return self._settings.max_in_flight
        current = self._current()
        return sum(load.capacity for load, _ in current) if current else None

    @contextmanager
    def generation(self) -> Iterator[None]:
        """Holds a place for one generation while the block runs; ResourceExhausted when there is none."""
        self._check()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def _check(self) -> None:
        if not self._settings.enabled:
            return
        limit = self.limit
        if limit is not None and self.in_flight >= limit:
            raise self._refusal(f"the gateway has {self.in_flight} generations in flight, its limit",
                                "GATEWAY_AT_CAPACITY")
        current = self._current()
        now = self._clock()
        if current and all(load.full and now - seen_at < self._settings.full_hold_s for load, seen_at in current):
            active, capacity = sum(load.active for load, _ in current), sum(load.capacity for load, _ in current)
            raise self._refusal(f"the inference service is full ({active} of {capacity} places taken)",
                                "INFERENCE_AT_CAPACITY")

    def _refusal(self, why: str, reason: str) -> ResourceExhausted:
        ADMISSION_REFUSALS.labels(reason).inc()
        return ResourceExhausted(f"{why}; retry later", retry_after_s=self._settings.retry_after_s, reason=reason)
