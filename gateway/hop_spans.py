"""The gateway's hop spans: one CLIENT span per hop of a request, with the hop's budget.

``hop_span`` opens a hop's span under the request's span; ``record_hop`` puts
the hop's elapsed time and budget on it. A hop answered inside the gateway
(the cache's near tier) makes no span unless it has to (``DeferredHopSpan``).
"""
from __future__ import annotations

import time

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshkit import span_names as names
from meshkit.tracing.server_span import set_when_it_ends
from meshkit.tracing.stand_in import start_span_later


def hop_span(tracer: trace.Tracer, hop: str, parent: trace.Span, budget_ms: float, *,
             deferred: bool = False) -> HopSpanScope:
    """A span for one of the gateway's hops, child of the request's span, current inside the block.

    Pass ``outgoing_metadata(span)`` on the hop's downstream call: the called
    service's server span then hangs under this hop span. The budget goes on
    the span with ``record_hop``. ``deferred``: the span starts only if the hop
    turns out to need one (``DeferredHopSpan``). Under a parent that records
    nothing (tracing off, or a trace sampled out) the block runs in the parent's
    span: downstream calls still carry its context, and no span is made.
    """
    return HopSpanScope(tracer, hop, parent, deferred)


class HopSpanScope:
    """The context manager ``hop_span`` returns; a failure in the block marks the span as an error."""

    __slots__ = ("_deferred", "_hop", "_parent", "_span", "_token", "_tracer")

    def __init__(self, tracer: trace.Tracer, hop: str, parent: trace.Span, deferred: bool):
        self._tracer, self._hop, self._parent, self._deferred = tracer, hop, parent, deferred
        self._span: trace.Span = parent
        self._token = None

    def __enter__(self) -> trace.Span:
        if not self._parent.is_recording():
            return self._parent
        if self._deferred:
            self._span = DeferredHopSpan(self._tracer, self._hop, self._parent)
        else:
            self._span = _start_hop_span(self._tracer, self._hop, self._parent)
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, error_type, error, traceback) -> None:
        if self._token is None:
            return
        if error_type is not None:
            self._span.set_status(Status(StatusCode.ERROR, error_type.__name__))
        self._span.end()
        otel_context.detach(self._token)


def _start_hop_span(tracer: trace.Tracer, hop: str, parent: trace.Span, start_ns: int | None = None) -> trace.Span:
    # Its SDK span is made once the hop is over and the request has gone on (meshkit/tracing/stand_in.py).
    return start_span_later(tracer, names.HOP_SPAN_PREFIX + hop, trace.set_span_in_context(parent),
                            SpanKind.CLIENT, {names.HOP: hop}, start_ns)


def record_measured_hop(tracer: trace.Tracer, hop: str, parent: trace.Span, start_ns: int, end_ns: int,
                        elapsed_ms: float, budget_ms: float, over_budget: bool) -> None:
    """A span for a hop timed after the fact (the time to first token, inside the inference hop)."""
    span = start_span_later(tracer, names.HOP_SPAN_PREFIX + hop, trace.set_span_in_context(parent),
                            attributes={names.HOP: hop}, start_ns=start_ns)
    record_hop(span, elapsed_ms, budget_ms, over_budget)
    span.end(end_time=end_ns)


class DeferredHopSpan(trace.Span):
    """A hop's span that exists only if the hop leaves the process, fails or runs over budget.

    The gateway's cache hop is mostly answered from its own memory (the near
    tier): no network, and a span of its own would cost that hit a few percent.
    This span starts for real, dated from the hop's start, the first time
    anything needs its context (a child span such as the Redis lookup, or a
    downstream call's metadata) or its status, or when it ends over budget.
    Otherwise it never exists: the attributes set on it (the tier that answered)
    go to the request span, and the hop is in the response's timings and the
    hop metrics only.
    """

    def __init__(self, tracer: trace.Tracer, hop: str, parent: trace.Span):
        self._tracer, self._hop, self._parent = tracer, hop, parent
        self._start_ns = time.time_ns()
        self._span: trace.Span | None = None
        self._attributes: dict = {}

    def _started(self) -> trace.Span:
        if self._span is None:
            self._span = _start_hop_span(self._tracer, self._hop, self._parent, self._start_ns)
            if self._attributes:
                self._span.set_attributes(self._attributes)
        return self._span

    def get_span_context(self) -> trace.SpanContext:
        return self._started().get_span_context()

    def is_recording(self) -> bool:
        return True  # made only under a recording parent

    def set_attribute(self, key: str, value) -> None:
        if self._span is None:
            self._attributes[key] = value
        else:
            self._span.set_attribute(key, value)

    def set_attributes(self, attributes) -> None:
        if self._span is None:
            self._attributes.update(attributes)
        else:
            self._span.set_attributes(attributes)

    def add_event(self, name: str, attributes=None, timestamp: int | None = None) -> None:
        self._started().add_event(name, attributes, timestamp)

    def add_link(self, context: trace.SpanContext, attributes=None) -> None:
        self._started().add_link(context, attributes)

    def update_name(self, name: str) -> None:
        self._started().update_name(name)

    def set_status(self, status, description: str | None = None) -> None:
        self._started().set_status(status, description)

    def record_exception(self, exception: BaseException, attributes=None, timestamp: int | None = None,
                         escaped: bool = False) -> None:
        self._started().record_exception(exception, attributes, timestamp, escaped)

    def end(self, end_time: int | None = None) -> None:
        if self._span is None and self._attributes.get(names.OVER_BUDGET) is not True:
            kept = {k: v for k, v in self._attributes.items() if k not in _HOP_BUDGET_KEYS}
            if kept:
                set_when_it_ends(self._parent, kept)
            return
        self._started().end(end_time)


_HOP_BUDGET_KEYS = frozenset({names.ELAPSED_MS, names.BUDGET_MS, names.OVER_BUDGET})


def record_hop(span: trace.Span, elapsed_ms: float, budget_ms: float, over_budget: bool) -> None:
    span.set_attributes({names.ELAPSED_MS: elapsed_ms, names.BUDGET_MS: budget_ms, names.OVER_BUDGET: over_budget})
