"""Spans whose SDK span is made off the request's path: ``start_span_later``.

Starting an OpenTelemetry SDK span, setting its attributes and ending it take tens of
microseconds of Python each time, and a request to a first token crosses about ten spans
in three processes. A ``StandInSpan`` picks its ids and sampling decision when it starts,
as the SDK tracer would, so children, downstream calls (``traceparent``) and the response's
trace id see the span that is exported; what is set on it is kept; ``end`` takes the time
and leaves the making of the SDK span, with those ids (``ChosenIds``) and times, to the
event loop's next turn, once the reply or the next hop's call is on its way (``after_reply``).
Outside an event loop (the built-in engine's worker thread) the SDK span is made at once.
"""
from __future__ import annotations

import asyncio
import time

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, TraceFlags

from meshkit.tracing.provider import ChosenIds, tracer


def start_span_later(service_tracer: trace.Tracer, name: str, parent: otel_context.Context,
                     kind: SpanKind = SpanKind.INTERNAL, attributes: dict | None = None,
                     start_ns: int | None = None) -> trace.Span:
    """A ``StandInSpan`` of ``service_tracer`` where it takes ids picked up front (``configure_tracing``'s
    does), else that tracer's own span (none with tracing off)."""
    if isinstance(getattr(service_tracer, "id_generator", None), ChosenIds):
        return StandInSpan(service_tracer, name, parent, kind, attributes, start_ns)
    return service_tracer.start_span(name, context=parent, kind=kind, attributes=attributes, start_time=start_ns)


def span_later(service_tracer: trace.Tracer, name: str, attributes: dict | None = None):
    """As ``service_tracer.start_as_current_span(name)``, with a ``StandInSpan``: current inside the block,
    ended when it ends, an exception leaving it recorded on it and its status an error."""
    return trace.use_span(start_span_later(service_tracer, name, otel_context.get_current(), attributes=attributes),
                          end_on_exit=True)


class _Tracers:
    """Each service's tracer from the provider set now: the SDK's own once ``configure_tracing`` ran (a
    tracer got at import is a proxy, which the SDK's ids cannot be chosen through)."""

    def __init__(self):
        self._provider: trace.TracerProvider | None = None
        self._tracers: dict[str, trace.Tracer] = {}

    def of(self, service: str) -> trace.Tracer:
        provider = trace.get_tracer_provider()
        if provider is not self._provider:  # set once per process; a test may set another
            self._provider, self._tracers = provider, {}
        found = self._tracers.get(service)
        if found is None:
            found = self._tracers[service] = tracer(service)
        return found


tracer_now = _Tracers().of


class StandInSpan(trace.Span):
    """A span while its work runs; the SDK span is made after it ends (the module's docstring)."""

    def __init__(self, sdk_tracer, name: str, parent: otel_context.Context, kind: SpanKind = SpanKind.INTERNAL,
                 attributes: dict | None = None, start_ns: int | None = None):
        self._tracer, self._name, self._parent, self._kind = sdk_tracer, name, parent, kind
        self._start_ns = time.time_ns() if start_ns is None else start_ns
        caller = trace.get_current_span(parent).get_span_context()
        if caller.is_valid:
            trace_id, random_id = caller.trace_id, caller.trace_flags.random_trace_id
        else:
            trace_id, random_id = sdk_tracer.id_generator.generate_trace_id(), True
        sampling = sdk_tracer.sampler.should_sample(parent, trace_id, name, kind)
        flags = TraceFlags.SAMPLED if sampling.decision.is_sampled() else TraceFlags.DEFAULT
        self._context = trace.SpanContext(
            trace_id, sdk_tracer.id_generator.generate_span_id(), is_remote=False,
            trace_flags=TraceFlags(flags | TraceFlags.RANDOM_TRACE_ID if random_id else flags),
            trace_state=sampling.trace_state)
        self._recording = sampling.decision.is_recording()
        self._attributes: dict = dict(attributes) if attributes else {}
        self._later: list[tuple[str, tuple]] = []  # the SDK span's calls, in order: events, links, status

    def get_span_context(self) -> trace.SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._recording

    def set_attribute(self, key: str, value) -> None:
        self._attributes[key] = value

    def set_attributes(self, attributes) -> None:
        self._attributes.update(attributes)

    def add_event(self, name: str, attributes=None, timestamp: int | None = None) -> None:
        self._later.append(("add_event", (name, attributes, timestamp or time.time_ns())))

    def add_link(self, context: trace.SpanContext, attributes=None) -> None:
        self._later.append(("add_link", (context, attributes)))

    def update_name(self, name: str) -> None:
        self._name = name

    def set_status(self, status, description: str | None = None) -> None:
        self._later.append(("set_status", (status, description)))

    def record_exception(self, exception: BaseException, attributes=None, timestamp: int | None = None,
                         escaped: bool = False) -> None:
        self._later.append(("record_exception", (exception, attributes, timestamp or time.time_ns(), escaped)))

    def end(self, end_time: int | None = None) -> None:
        if not self._recording:
            return
        self._recording = False  # ends once
        after_reply(self._made, time.time_ns() if end_time is None else end_time)

    def _made(self, end_time: int) -> None:
        with self._tracer.id_generator.chosen(self._context.trace_id, self._context.span_id):
            span = self._tracer.start_span(self._name, context=self._parent, kind=self._kind,
                                           attributes=self._attributes, start_time=self._start_ns)
        for method, args in self._later:
            getattr(span, method)(*args)
        span.end(end_time)


def after_reply(work, *args) -> None:
    """Runs ``work(*args)`` on the event loop's next turn, once the reply is on its way; at once outside a loop.

    Making an SDK span and setting its last attributes take tens of microseconds,
    a few percent of a cache hit: the caller need not wait for them. The span's
    times are taken before, so they are exact.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        work(*args)
    else:
        loop.call_soon(work, *args)
