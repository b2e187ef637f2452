"""The SERVER span each served call runs in, continuing the caller's trace.

``server_interceptors`` gives every service's server a ``TracingInterceptor``;
``request_span`` is the span a handler hangs its work from.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshkit import span_names as names
from meshkit.interceptor import ObservingInterceptor, observed
from meshkit.tracing.propagation import extract_context
from meshkit.tracing.stand_in import start_span_later, tracer_now

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
        self._service = service

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        # The name is the conventional "package.Service/Method", so rpc.service and
        # rpc.method (each a cost on every call) would only repeat it.
        span_name = method.lstrip("/")
        return observed(handler, lambda context: self._start(span_name, context), _end)

    # Spans are started and made current by hand, not with start_as_current_span:
    # this runs on every call, and the cache-hit path is about a millisecond.
    def _start(self, span_name: str, context) -> _ServedCall:
        parent = extract_context(context.invocation_metadata())
        # A stand-in while the call runs: its SDK span is made after the reply (meshkit/tracing/stand_in.py).
        span = start_span_later(tracer_now(self._service), span_name, parent, SpanKind.SERVER)
        call = _ServedCall(span)
        call.token = otel_context.attach(
            otel_context.set_value(_SERVED_CALL, call, trace.set_span_in_context(span, parent)))
        return call


def _end(call: _ServedCall, code: grpc.StatusCode) -> None:
    otel_context.detach(call.token)
    call.attributes[names.RPC_GRPC_STATUS_CODE] = code.value[0]
    # A stand-in's end leaves the SDK span to the loop's next turn (meshkit/tracing/stand_in.py).
    call.finish(code.name if code in _SERVER_ERRORS else None, time.time_ns())


_SERVED_CALL = otel_context.create_key("nlpmesh.served_call")


class _ServedCall:
    """A served call's SERVER span, and the attributes it gets when it ends.

    Its attributes are set once, with the status code, when the call ends; the
    SDK span is made after the reply (its span is a ``StandInSpan``).
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
