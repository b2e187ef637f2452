"""Admission control: a generation the inference service cannot take is refused before any hop.

Under load the gateway used to accept every request and spend its template and
tokenizer hops on it, only for the request to wait in the inference queue, or
be refused there, or run out of time on the way while the CPU was saturated.
Instead, after a cache miss (a cache hit is always served) and before the
template hop, ``InferenceAdmission.generation()`` admits a generation or raises
ResourceExhausted with RetryInfo and an ErrorInfo reason:

- ``GATEWAY_AT_CAPACITY``: this gateway already has as many generations in
  flight (admitted, not yet ended) as the inference service can hold, its
  ``capacity`` (max_running + max_queue, reported in the metadata of every
  Generate and ModelInfo: services/inference/load_report.py), or as
  ``max_in_flight`` when that is set;
- ``INFERENCE_AT_CAPACITY``: the latest report, younger than ``full_hold_s``,
  said the inference service was full (other gateways fill it too). The next
  report, sent when any generation starts or ends, lifts it. A generation this
  gateway cancels (its caller went away) sends no end report: the place it
  frees is taken off the held report at once (``cancelled``), so a cancel does
  not leave new requests refused for ``full_hold_s``.

Before the first report, and with ``enabled`` off, every generation is admitted.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from meshkit.errors import ResourceExhausted
from services.inference.load_report import InferenceLoad


@dataclass(frozen=True)
class AdmissionSettings:
    enabled: bool = True
    max_in_flight: int = 0  # this gateway's own ceiling on generations in flight; 0 = the reported capacity
    full_hold_s: float = 0.5  # how long a report of a full inference refuses, unless a newer one lifts it
    retry_after_s: float = 1.0  # the RetryInfo delay of a refusal


class InferenceAdmission:
    def __init__(self, settings: AdmissionSettings, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._clock = clock
        self._load: InferenceLoad | None = None
        self._seen_at = 0.0
        self.in_flight = 0

    def observe(self, load: InferenceLoad | None) -> None:
        """Keeps the inference service's latest report (None: the call carried none)."""
        if load is not None:
            self._load, self._seen_at = load, self._clock()

    def cancelled(self) -> None:
        """One of this gateway's generations was cancelled before the inference service reported its end."""
        load = self._load
        if load is not None and load.active > 0:
            self._load = InferenceLoad(load.active - 1, load.capacity)

    @property
    def limit(self) -> int | None:
        """How many generations this gateway may have in flight; None = unknown, so unlimited."""
        if self._settings.max_in_flight:
            return self._settings.max_in_flight
        return self._load.capacity if self._load is not None else None

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
        load = self._load
        if load is not None and load.full and self._clock() - self._seen_at < self._settings.full_hold_s:
            raise self._refusal(f"the inference service is full ({load.active} of {load.capacity} places taken)",
                                "INFERENCE_AT_CAPACITY")

    def _refusal(self, why: str, reason: str) -> ResourceExhausted:
        return ResourceExhausted(f"{why}; retry later", retry_after_s=self._settings.retry_after_s, reason=reason)
