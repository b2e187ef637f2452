"""Prometheus metrics for every service: served RPCs and /metrics.

Every metric lives in the process's default registry and is created once, at
import, by the module that records it (this one, promptcache/metrics.py,
gateway/hop_metrics.py, services/inference/metrics.py), so any number
of in-process servers share them. Names carry the ``nlpmesh_`` prefix and base
units; labels take only values from a fixed set (service, method, status code,
hop, tier, reason), never request ids, tenants or template variables.
"""
from __future__ import annotations

import errno
import logging
import time

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from meshkit.interceptor import ObservingInterceptor, observed
from meshkit.ports import PortInUse

log = logging.getLogger("nlpmesh.metrics")

# From sub-millisecond hops (a near-cache hit) to multi-second inference.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RPC_LATENCY = Histogram(
    "nlpmesh_rpc_duration_seconds",
    "Time a served RPC took, from arrival to its last message (streams: until the stream ends).",
    ["service", "method"], buckets=LATENCY_BUCKETS_S,
)
RPC_HANDLED = Counter(
    "nlpmesh_rpc_handled_total", "Served RPCs by final status code.", ["service", "method", "code"],
)

# Health checks and reflection are the platform's, not the mesh's work.


def server_interceptors(service: str) -> list:
    """Interceptors that record every served call's latency and status."""
    return [RpcMetricsInterceptor(service)]


def start_metrics_server(settings):
    """Serves /metrics on ``settings.metrics_port`` (0 = no endpoint); returns the HTTP server or None.

    A port that cannot be bound raises OSError (PortInUse when another process holds it): a service must
    not run unseen.
    """
    if settings.metrics_port <= 0:
        return None
    try:
        server, _thread = start_http_server(settings.metrics_port, addr=settings.host)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise PortInUse("metrics", f"{settings.host}:{settings.metrics_port}") from None
        raise
    log.info("metrics at http://%s:%d/metrics", settings.host, settings.metrics_port)
    return server


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
