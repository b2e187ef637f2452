"""W3C trace context in gRPC metadata.

Only ``traceparent`` and ``tracestate`` are read from incoming metadata. A
malformed header is ignored by the propagator and the request starts a new trace.
"""
from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

_TRACE_HEADERS = ("traceparent", "tracestate")


def extract_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    carrier = {key: value for key, value in (metadata or ()) if key in _TRACE_HEADERS and isinstance(value, str)}
    if not carrier:  # no caller context: a new trace (skips the propagators, on every call)
        return otel_context.Context()
    return propagate.extract(carrier)


def outgoing_metadata(span: trace.Span) -> tuple[tuple[str, str], ...]:
    """The span's trace context as gRPC metadata for a downstream call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def current_metadata() -> tuple[tuple[str, str], ...]:
    """The current span's trace context as gRPC metadata (a task started inside a span keeps it)."""
    return outgoing_metadata(trace.get_current_span())


def trace_id_hex(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")
