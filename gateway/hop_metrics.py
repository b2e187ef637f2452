"""Prometheus metrics for the gateway's hops: latency, budget used and overruns per hop.

Created once, at import, in the process's default registry, as the shared ones
in meshkit/metrics.py are. The only label is the hop's name, from a fixed set.
The gateway calls ``observe_hop`` once per hop of every request.
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram

from meshkit.metrics import LATENCY_BUCKETS_S

# Elapsed over budget: 1.0 is exactly on budget.
BUDGET_RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 5.0)

HOP_LATENCY = Histogram(
    "nlpmesh_hop_latency_seconds", "Time one hop of a gateway request took.", ["hop"],
    buckets=LATENCY_BUCKETS_S,
)
HOP_OVER_BUDGET = Counter(
    "nlpmesh_hop_over_budget_total", "Gateway hops that took longer than their budget.", ["hop"],
)
HOP_BUDGET_USED = Histogram(
    "nlpmesh_hop_budget_used_ratio", "A hop's elapsed time over its budget (1 = exactly on budget).",
    ["hop"], buckets=BUDGET_RATIO_BUCKETS,
)


class _HopSeries:
    """One hop's label children, looked up once (``labels()`` takes a lock per call)."""

    __slots__ = ("budget_used", "latency", "over_budget")

    def __init__(self, hop: str):
        self.latency = HOP_LATENCY.labels(hop)
        self.over_budget = HOP_OVER_BUDGET.labels(hop)  # exported at 0 until the first overrun
        self.budget_used = HOP_BUDGET_USED.labels(hop)


_hops: dict[str, _HopSeries] = {}


def observe_hop(hop: str, elapsed_ms: float, budget_ms: float, over_budget: bool, trace_id: int = 0) -> None:
    """One hop of one gateway request: latency histogram and over-budget counter. ``trace_id`` (the request's,
    0 = none) goes with the latency as an OpenMetrics exemplar: a slow bucket links to a trace that fell in it."""
    series = _hops.get(hop)
    if series is None:
        series = _hops.setdefault(hop, _HopSeries(hop))
    series.latency.observe(elapsed_ms / 1000.0, {"trace_id": format(trace_id, "032x")} if trace_id else None)
    if budget_ms > 0:
        series.budget_used.observe(elapsed_ms / budget_ms)
    if over_budget:
        series.over_budget.inc()
