"""The SERVER span each served call runs in, continuing the caller's trace.

``server_interceptors`` gives every service's server a ``TracingInterceptor``;
``request_span`` is the span a handler hangs its work from.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags

from meshkit import span_names as names
from meshkit.interceptor import ObservingInterceptor, observed
from meshkit.tracing.propagation import extract_context
from meshkit.tracing.provider import ChosenIds, tracer, tracer_name

# Server-side codes that mean the service failed (the others are the caller's doing).
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})


def server_interceptors(service: str) -> list:
    """Interceptors that continue the caller's trace in a server span per call.

    Hand-written rather than opentelemetry-instrumentation-grpc's aio
    interceptor: on the gateway's cache-hit path that one cost about twice as
    much (it proxies the servicer context and parses the peer on every call).
    """
    return [TracingInterceptor(service)]


@contextmanager
def request_span(service_tracer: trace.Tracer, metadata, name: str):
    """The span a request's work hangs from: the server span the interceptor opened.

    A handler called without the interceptor opens its own span, continuing
    the trace context in ``metadata``. With tracing off there is none to open.
    """
    current = trace.get_current_span()
    if current.get_span_context().is_valid or isinstance(service_tracer, trace.NoOpTracer):
        yield current
        return
    with service_tracer.start_as_current_span(name, context=extract_context(metadata), kind=SpanKind.SERVER) as span:
        yield span


class TracingInterceptor(ObservingInterceptor):
    """Runs each served call (unary or server-streaming) inside a SERVER span.

    The span continues the caller's ``traceparent``; it is named after the
    method (``nlpmesh.template.v1.TemplateService/Render``) and carries the
    final gRPC status. Handlers are wrapped once per method.
    """

    def __init__(self, service: str):
        super().__init__()
        self._tracer = tracer(service)
        self._tracer_name = tracer_name(service)
        self._provider: trace.TracerProvider | None = None
        self._sdk_tracer: trace.Tracer | None = None

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        # The name is the conventional "package.Service/Method", so rpc.service and
        # rpc.method (each a cost on every call) would only repeat it.
        span_name = method.lstrip("/")
        return observed(handler, lambda context: self._start(span_name, context), _end)

    # Spans are started and made current by hand, not with start_as_current_span:
    # this runs on every call, and the cache-hit path is about a millisecond.
    def _start(self, span_name: str, context) -> _ServedCall:
        parent = extract_context(context.invocation_metadata())
        sdk_tracer = self._tracer_choosing_ids()
        if sdk_tracer is not None:
            span = ServerSpan(sdk_tracer, span_name, parent)
        else:
            span = self._tracer.start_span(span_name, context=parent, kind=SpanKind.SERVER)
        call = _ServedCall(span)
        call.token = otel_context.attach(
            otel_context.set_value(_SERVED_CALL, call, trace.set_span_in_context(span, parent)))
        return call

    def _tracer_choosing_ids(self):
        """The SDK tracer, when its provider takes ids picked up front (``configure_tracing``'s does)."""
        provider = trace.get_tracer_provider()
        if provider is not self._provider:
            sdk_tracer = provider.get_tracer(self._tracer_name) if isinstance(provider, TracerProvider) else None
            chooses = isinstance(getattr(sdk_tracer, "id_generator", None), ChosenIds)
            self._provider, self._sdk_tracer = provider, sdk_tracer if chooses else None
        return self._sdk_tracer


class ServerSpan(trace.Span):
    """A served call's SERVER span while the call runs; the SDK span is made when it ends.

    Starting an SDK span and updating it on the request's path cost a cache hit
    about a tenth of its time. This stands in for it: its ids and sampling
    decision are picked when the call starts, as the tracer would pick them, so
    child spans, downstream calls and the response's trace id see the span that
    is exported. What is set on it is kept; ``end`` makes the SDK span with
    those ids (``ChosenIds``), dated from the call's start, and gives it all.
    """

    def __init__(self, sdk_tracer, name: str, parent: otel_context.Context):
        self._tracer, self._name, self._parent = sdk_tracer, name, parent
        self._start_ns = time.time_ns()
        caller = trace.get_current_span(parent).get_span_context()
        if caller.is_valid:
            trace_id, random_id = caller.trace_id, caller.trace_flags.random_trace_id
        else:
            trace_id, random_id = sdk_tracer.id_generator.generate_trace_id(), True
        sampling = sdk_tracer.sampler.should_sample(parent, trace_id, name, SpanKind.SERVER)
        flags = TraceFlags.SAMPLED if sampling.decision.is_sampled() else TraceFlags.DEFAULT
        self._context = trace.SpanContext(
            trace_id, sdk_tracer.id_generator.generate_span_id(), is_remote=False,
            trace_flags=TraceFlags(flags | TraceFlags.RANDOM_TRACE_ID if random_id else flags),
            trace_state=sampling.trace_state)
        self._recording = sampling.decision.is_recording()
        self._attributes: dict = {}
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
        end_time = time.time_ns() if end_time is None else end_time
        with self._tracer.id_generator.chosen(self._context.trace_id, self._context.span_id):
            span = self._tracer.start_span(self._name, context=self._parent, kind=SpanKind.SERVER,
                                           attributes=self._attributes, start_time=self._start_ns)
        for method, args in self._later:
            getattr(span, method)(*args)
        span.end(end_time)


def _end(call: _ServedCall, code: grpc.StatusCode) -> None:
    otel_context.detach(call.token)
    call.attributes[names.RPC_GRPC_STATUS_CODE] = code.value[0]
    _after_reply(call.finish, code.name if code in _SERVER_ERRORS else None, time.time_ns())


_SERVED_CALL = otel_context.create_key("nlpmesh.served_call")


class _ServedCall:
    """A served call's SERVER span, and the attributes it gets when it ends.

    Its attributes are set once, with the status code, after the reply: each
    SDK update costs microseconds on the request's path.
    """

    __slots__ = ("attributes", "span", "token")

    def __init__(self, span: trace.Span):
        self.span = span
        self.attributes: dict = {names.RPC_SYSTEM: "grpc"}
        self.token = None

    def finish(self, error: str | None, end_ns: int) -> None:
        self.span.set_attributes(self.attributes)
        if error:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end(end_time=end_ns)


def set_when_it_ends(span: trace.Span, attributes: dict) -> None:
    """Sets ``attributes`` on ``span``: with the status code if it is the served call's span, else now."""
    call = otel_context.get_value(_SERVED_CALL)
    if isinstance(call, _ServedCall) and call.span is span:
        call.attributes.update(attributes)
    else:
        span.set_attributes(attributes)


def _after_reply(work, *args) -> None:
    """Runs ``work(*args)`` on the event loop's next turn, once the reply is on its way; at once outside a loop.

    Ending an SDK span and setting its last attributes take tens of microseconds,
    a few percent of a cache hit: the caller need not wait for them. The span's
    times are taken before, so they are exact.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        work(*args)
    else:
        loop.call_soon(work, *args)
