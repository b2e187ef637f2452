"""OpenTelemetry set-up shared by every process.

W3C trace context travels in gRPC metadata; only ``traceparent`` and
``tracestate`` are read from incoming metadata. A malformed header is ignored
by the propagator and the request starts a new trace.

Where spans go (``configure_tracing``, once per process, in ``main()``):
- OTLP over gRPC when the standard variables ask for it
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
  or ``OTEL_TRACES_EXPORTER=otlp``); the exporter reads the rest of the
  ``OTEL_EXPORTER_OTLP_*`` variables itself;
- ``<trace_dir>/<service>.jsonl``, one span per line, when a trace directory
  is set (``NLPMESH_TRACE_DIR``); ``nlpmesh trace`` draws these;
- nowhere with ``OTEL_SDK_DISABLED=true``: spans are not recorded and trace
  ids are all zeros.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags

from meshkit import span_names as names
from meshkit.interceptor import ObservingInterceptor, observed

log = logging.getLogger("nlpmesh.tracing")

_TRACE_HEADERS = ("traceparent", "tracestate")
# Server-side codes that mean the service failed (the others are the caller's doing).
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})


def configure_tracing(service: str, trace_dir: str | os.PathLike = "") -> trace.Tracer:
    """Installs the SDK tracer provider for this process and returns the service's tracer.

    Call once, from ``main()``: the provider is process-wide, and a second
    call keeps the first one's. The provider flushes its exporters at exit.
    """
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(resource=Resource.create({names.SERVICE_NAME: names.SERVICE_PREFIX + service}),
                                  id_generator=None if _sdk_disabled() else ChosenIds())
        if not _sdk_disabled():
            for exporter in _exporters(service, trace_dir):
                provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    return tracer(service)


def tracer(service: str) -> trace.Tracer:
    """The service's tracer; before ``configure_tracing`` it records nothing."""
    return trace.get_tracer(f"nlpmesh.{service}")


class ChosenIds(IdGenerator):
    """Random ids, except while ``chosen`` holds ids picked earlier: then those.

    The tracing interceptor picks a served call's ids when the call starts and
    makes its SDK span, with those ids, only after the reply (``ServerSpan``).
    """

    def __init__(self):
        self._random = RandomIdGenerator()
        self._chosen: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
            "nlpmesh.chosen_ids", default=None)

    @contextmanager
    def chosen(self, trace_id: int, span_id: int):
        token = self._chosen.set((trace_id, span_id))
        try:
            yield
        finally:
            self._chosen.reset(token)

    def generate_trace_id(self) -> int:
        chosen = self._chosen.get()
        return self._random.generate_trace_id() if chosen is None else chosen[0]

    def generate_span_id(self) -> int:
        chosen = self._chosen.get()
        return self._random.generate_span_id() if chosen is None else chosen[1]

    def is_trace_id_random(self) -> bool:
        return True  # chosen ids were drawn from the random generator too


def _sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _exporters(service: str, trace_dir: str | os.PathLike) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    if _otlp_wanted():
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter())
    if trace_dir:
        exporters.append(span_file_exporter(Path(trace_dir) / f"{service}.jsonl"))
    return exporters


def _otlp_wanted() -> bool:
    chosen = {e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in chosen:
        return False
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return bool(endpoint) or "otlp" in chosen


def span_file_exporter(path: Path) -> SpanExporter:
    """Appends finished spans to ``path`` as JSON lines (see ``span_line``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return SpanFileExporter(path.open("a", encoding="utf-8"))


class SpanFileExporter(SpanExporter):
    """Writes each batch of spans as JSON lines, one line per span.

    The batch processor calls this on its own thread. Formatting a batch is
    pure Python and holds the GIL; between chunks the thread lets go of it so
    the event loop's requests do not wait behind a whole batch.
    """

    CHUNK = 32

    def __init__(self, out: TextIO):
        self._out = out

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            for first in range(0, len(spans), self.CHUNK):
                self._out.write("".join(span_line(span) for span in spans[first:first + self.CHUNK]))
                time.sleep(0)  # releases the GIL
            self._out.flush()
        except (OSError, ValueError) as error:  # disk full, file closed: spans lost, service unharmed
            log.warning("cannot write spans: %s", error)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._out.close()


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode
# The fixed fields are formatted, not encoded: a line costs half as much, on the
# batch thread that shares the GIL with the requests.
_LINE = ('{"trace_id":"%032x","span_id":"%016x","parent_id":%s,"name":%s,"service":%s,"kind":"%s",'
         '"start_ns":%d,"end_ns":%d,"status":"%s","attributes":%s}\n')


def span_line(span: ReadableSpan) -> str:
    """One span as one compact JSON line: ids in hex, times in epoch nanoseconds."""
    context, parent = span.context, span.parent
    return _LINE % (
        context.trace_id, context.span_id, '"%016x"' % parent.span_id if parent is not None else "null",
        _encode(span.name), _encode(span.resource.attributes.get(names.SERVICE_NAME, "")), span.kind.name,
        span.start_time, span.end_time, span.status.status_code.name, _encode(dict(span.attributes or {})),
    )


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
        self._tracer_name = f"nlpmesh.{service}"
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


def _set_when_it_ends(span: trace.Span, attributes: dict) -> None:
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
    return tracer.start_span(names.HOP_SPAN_PREFIX + hop, context=trace.set_span_in_context(parent),
                             kind=SpanKind.CLIENT, attributes={names.HOP: hop}, start_time=start_ns)


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
                _set_when_it_ends(self._parent, kept)
            return
        self._started().end(end_time)


_HOP_BUDGET_KEYS = frozenset({names.ELAPSED_MS, names.BUDGET_MS, names.OVER_BUDGET})


def record_hop(span: trace.Span, elapsed_ms: float, budget_ms: float, over_budget: bool) -> None:
    span.set_attributes({names.ELAPSED_MS: elapsed_ms, names.BUDGET_MS: budget_ms, names.OVER_BUDGET: over_budget})
