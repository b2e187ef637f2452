"""Per-hop timings against budgets: what each response, trailer, span and metric shows."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from opentelemetry import trace

from services.gateway import hop_metrics as metrics
from services.gateway.budgets import ObservedLatency, RequestBudget
from services.gateway.hop_spans import hop_span, record_hop


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
    """Times one request's hops from its start; each hop gets a span and a metric.

    ``budget`` is set once the request's budget is known (it depends on the
    template); hops record their budget from it.
    """

    tracer: trace.Tracer | None = None
    parent: trace.Span = trace.INVALID_SPAN
    observed: ObservedLatency | None = None
    budget: RequestBudget | None = None
    started: float = field(default_factory=time.perf_counter)
    hops: list[HopTiming] = field(default_factory=list)

    @contextmanager
    def hop(self, name: str, deferred_span: bool = False):
        """Times the block as hop ``name``; yields its span (for the downstream call's metadata).

        ``deferred_span``: the hop makes a span only if it leaves the process, fails
        or runs over budget (meshkit.tracing.DeferredHopSpan), as a cache lookup
        answered from the near tier does not.
        """
        begun = time.perf_counter()
        budget = self._budget_for(name)
        if self.tracer is None:
            span_context = _no_span()
        else:
            span_context = hop_span(self.tracer, name, self.parent, budget, deferred=deferred_span)
        with span_context as span:
            succeeded = False
            try:
                yield span
                succeeded = True
            finally:
                self.record(name, begun, span=span, succeeded=succeeded)

    def record(self, name: str, begun: float, ended: float | None = None, span: trace.Span | None = None,
               succeeded: bool = True) -> HopTiming:
        ended = time.perf_counter() if ended is None else ended
        timing = HopTiming(name, (ended - begun) * 1000.0, self._budget_for(name))
        self.hops.append(timing)
        metrics.observe_hop(name, timing.elapsed_ms, timing.budget_ms, timing.over_budget)
        if span is not None:
            record_hop(span, timing.elapsed_ms, timing.budget_ms, timing.over_budget)
        if succeeded and self.observed is not None:
            self.observed.record(name, timing.elapsed_ms)
        return timing

    def record_span(self, name: str, begun: float, ended: float, parent: trace.Span) -> HopTiming:
        """A hop measured after the fact (time to first token), with a span of its own."""
        timing = self.record(name, begun, ended)
        if self.tracer is not None:
            start_ns, end_ns = _wall_ns(begun), _wall_ns(ended)
            span = self.tracer.start_span(f"hop {name}", context=trace.set_span_in_context(parent),
                                          start_time=start_ns, attributes={"nlpmesh.hop": name})
            record_hop(span, timing.elapsed_ms, timing.budget_ms, timing.over_budget)
            span.end(end_time=end_ns)
        return timing

    def finish(self) -> list[HopTiming]:
        """The hops so far plus ``total``, the gateway's own wall time against the total budget."""
        self.record("total", self.started)
        return list(self.hops)

    def _budget_for(self, name: str) -> float:
        return self.budget.budget_for(name) if self.budget is not None else 0.0


@contextmanager
def _no_span():
    yield trace.INVALID_SPAN


def _wall_ns(perf: float) -> int:
    """A perf_counter reading as wall-clock nanoseconds (span timestamps)."""
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


def server_timing(timings: list[HopTiming]) -> str:
    """The HTTP Server-Timing syntax: ``template;dur=0.41;desc="budget 100", cache;dur=0.62``."""
    parts = []
    for t in timings:
        part = f"{t.hop};dur={t.elapsed_ms:.3f}"
        if t.budget_ms:
            part += f';desc="budget {t.budget_ms:g}{" over" if t.over_budget else ""}"'
        parts.append(part)
    return ", ".join(parts)
