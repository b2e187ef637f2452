"""Prometheus metrics for every service: served RPCs, the gateway's hops, /metrics.

Every metric lives in the process's default registry and is created once, at
import, by the module that records it (this one, promptcache/metrics.py,
services/inference/metrics.py), so any number of in-process servers share them.
Names carry the ``nlpmesh_`` prefix and base units; labels take only values
from a fixed set (service, method, status code, hop, tier, reason), never
request ids, tenants or template variables.

The gateway calls ``observe_hop`` once per hop of every request.
"""
from __future__ import annotations

import logging
import time

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from meshkit.interceptor import ObservingInterceptor, observed

log = logging.getLogger("nlpmesh.metrics")

# From sub-millisecond hops (a near-cache hit) to multi-second inference.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Elapsed over budget: 1.0 is exactly on budget.
BUDGET_RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 5.0)

RPC_LATENCY = Histogram(
    "nlpmesh_rpc_duration_seconds",
    "Time a served RPC took, from arrival to its last message (streams: until the stream ends).",
    ["service", "method"], buckets=LATENCY_BUCKETS_S,
)
RPC_HANDLED = Counter(
    "nlpmesh_rpc_handled_total", "Served RPCs by final status code.", ["service", "method", "code"],
)
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

# Health checks and reflection are the platform's, not the mesh's work.


def server_interceptors(service: str) -> list:
    """Interceptors that record every served call's latency and status."""
    return [RpcMetricsInterceptor(service)]


def start_metrics_server(settings):
    """Serves /metrics on ``settings.metrics_port`` (0 = no endpoint); returns the HTTP server or None.

    A port that cannot be bound raises OSError: a service must not run unseen.
    """
    if settings.metrics_port <= 0:
        return None
    server, _thread = start_http_server(settings.metrics_port, addr=settings.host)
    log.info("metrics at http://%s:%d/metrics", settings.host, settings.metrics_port)
    return server


class _HopSeries:
    """One hop's label children, looked up once (``labels()`` takes a lock per call)."""

    __slots__ = ("budget_used", "latency", "over_budget")

    def __init__(self, hop: str):
        self.latency = HOP_LATENCY.labels(hop)
        self.over_budget = HOP_OVER_BUDGET.labels(hop)  # exported at 0 until the first overrun
        self.budget_used = HOP_BUDGET_USED.labels(hop)


_hops: dict[str, _HopSeries] = {}


def observe_hop(hop: str, elapsed_ms: float, budget_ms: float, over_budget: bool) -> None:
    """One hop of one gateway request: latency histogram and over-budget counter."""
    series = _hops.get(hop)
    if series is None:
        series = _hops.setdefault(hop, _HopSeries(hop))
    series.latency.observe(elapsed_ms / 1000.0)
    if budget_ms > 0:
        series.budget_used.observe(elapsed_ms / budget_ms)
    if over_budget:
        series.over_budget.inc()


class _MethodSeries:
    """One method's latency child and its per-code counters."""

    __slots__ = ("_handled", "latency", "method", "service")

    def __init__(self, service: str, method: str):
        self.service, self.method = service, method
        self.latency = RPC_LATENCY.labels(service, method)
        self._handled: dict[grpc.StatusCode, object] = {}

    def record(self, started: float, code: grpc.StatusCode) -> None:
        self.latency.observe(time.perf_counter() - started)
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled.setdefault(code, RPC_HANDLED.labels(self.service, self.method, code.name))
        counter.inc()


class RpcMetricsInterceptor(ObservingInterceptor):
    """Times each served call and counts it by status code.

    Only methods a servicer registered are recorded (a client cannot mint label
    values by calling made-up methods). Handlers are wrapped once per method.
    """

    def __init__(self, service: str):
        super().__init__()
        self._service = service

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        series = _MethodSeries(self._service, method.rsplit("/", 1)[-1])
        return observed(handler, lambda context: time.perf_counter(), series.record)







