"""OpenTelemetry set-up shared by every process.

W3C trace context travels in gRPC metadata; only ``traceparent`` and
``tracestate`` are read from incoming metadata. A malformed header is ignored
by the propagator and the request starts a new trace.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

_TRACE_HEADERS = ("traceparent", "tracestate")


def configure_tracing(service_name: str) -> trace.Tracer:
    """Installs the SDK tracer provider (real trace ids) and returns a tracer."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": f"nlpmesh-{service_name}"}))
        trace.set_tracer_provider(provider)
    return trace.get_tracer(f"nlpmesh.{service_name}")


def extract_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    carrier = {key: value for key, value in (metadata or ()) if key in _TRACE_HEADERS and isinstance(value, str)}
    return propagate.extract(carrier)


def outgoing_metadata(span: trace.Span) -> tuple[tuple[str, str], ...]:
    """The span's trace context as gRPC metadata for a downstream call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def trace_id_hex(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


def server_interceptors(service: str) -> list:
    """Interceptors that continue the caller's trace in a server span per call."""
    return []


@contextmanager
def hop_span(tracer: trace.Tracer, hop: str, parent: trace.Span, budget_ms: float):
    """A span for one of the gateway's hops, child of the request's span."""
    with tracer.start_as_current_span(
        f"hop {hop}", context=trace.set_span_in_context(parent), kind=trace.SpanKind.CLIENT,
        attributes={"nlpmesh.hop": hop, "nlpmesh.budget_ms": budget_ms},
    ) as span:
        yield span


def record_hop(span: trace.Span, elapsed_ms: float, budget_ms: float, over_budget: bool) -> None:
    span.set_attribute("nlpmesh.elapsed_ms", elapsed_ms)
    span.set_attribute("nlpmesh.budget_ms", budget_ms)
    span.set_attribute("nlpmesh.over_budget", over_budget)
