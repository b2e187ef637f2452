"""Per-hop timings: what each response, trailer and the CLI table show."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HopTiming:
    hop: str
    elapsed_ms: float
    budget_ms: float = 0.0

    @property
    def over_budget(self) -> bool:
        return self.budget_ms > 0 and self.elapsed_ms > self.budget_ms


@dataclass
class HopClock:
    """Records each hop's elapsed time from one request's start."""

    started: float = field(default_factory=time.perf_counter)
    hops: list[HopTiming] = field(default_factory=list)

    @contextmanager
    def hop(self, name: str):
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, begun)

    def record(self, name: str, begun: float, ended: float | None = None) -> None:
        ended = time.perf_counter() if ended is None else ended
        self.hops.append(HopTiming(name, (ended - begun) * 1000.0))

    def finish(self) -> list[HopTiming]:
        """The hops so far plus ``total``, the gateway's own wall time."""
        total = HopTiming("total", (time.perf_counter() - self.started) * 1000.0)
        return [*self.hops, total]


def server_timing(timings: list[HopTiming]) -> str:
    """The HTTP Server-Timing syntax: ``template;dur=0.41, cache;dur=0.62``."""
    return ", ".join(f"{t.hop};dur={t.elapsed_ms:.3f}" for t in timings)
