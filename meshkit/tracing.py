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
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshkit import span_names as names
from meshkit.call_status import ObservingInterceptor, observed

log = logging.getLogger("nlpmesh.tracing")

_TRACE_HEADERS = ("traceparent", "tracestate")
# Server-side codes that mean the service failed (the others are the caller's doing).
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
_SERVER_ATTRIBUTES = {names.RPC_SYSTEM: "grpc"}


def configure_tracing(service: str, trace_dir: str | os.PathLike = "") -> trace.Tracer:
    """Installs the SDK tracer provider for this process and returns the service's tracer.

    Call once, from ``main()``: the provider is process-wide, and a second
    call keeps the first one's. The provider flushes its exporters at exit.
    """
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(resource=Resource.create({names.SERVICE_NAME: names.SERVICE_PREFIX + service}))
        if not _sdk_disabled():
            for exporter in _exporters(service, trace_dir):
                provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    return tracer(service)


def tracer(service: str) -> trace.Tracer:
    """The service's tracer; before ``configure_tracing`` it records nothing."""
    return trace.get_tracer(f"nlpmesh.{service}")


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


_encode_line = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def span_line(span: ReadableSpan) -> str:
    """One span as one compact JSON line: ids in hex, times in epoch nanoseconds."""
    context, parent = span.context, span.parent
    return _encode_line({
        "trace_id": "%032x" % context.trace_id,
        "span_id": "%016x" % context.span_id,
        "parent_id": "%016x" % parent.span_id if parent is not None else None,
        "name": span.name,
        "service": span.resource.attributes.get(names.SERVICE_NAME, ""),
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }) + "\n"


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
    the trace context in ``metadata``.
    """
    current = trace.get_current_span()
    if current.get_span_context().is_valid:
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

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        # The name is the conventional "package.Service/Method", so rpc.service and
        # rpc.method (each a cost on every call) would only repeat it.
        span_name = method.lstrip("/")
        attributes = _SERVER_ATTRIBUTES
        return observed(handler, lambda context: self._start(span_name, attributes, context), _end)

    # Spans are started and made current by hand, not with start_as_current_span:
    # this runs on every call, and the cache-hit path is under a millisecond.
    def _start(self, span_name: str, attributes: dict, context) -> tuple[trace.Span, object]:
        parent = extract_context(context.invocation_metadata())
        span = self._tracer.start_span(span_name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        return span, otel_context.attach(trace.set_span_in_context(span, parent))


def _end(started: tuple[trace.Span, object], code: grpc.StatusCode) -> None:
    span, token = started
    span.set_attribute(names.RPC_GRPC_STATUS_CODE, code.value[0])
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()
    otel_context.detach(token)


@contextmanager
def hop_span(tracer: trace.Tracer, hop: str, parent: trace.Span, budget_ms: float):
    """A span for one of the gateway's hops, child of the request's span.

    Pass ``outgoing_metadata(span)`` on the hop's downstream call: the called
    service's server span then hangs under this hop span.
    """
    span = tracer.start_span(names.HOP_SPAN_PREFIX + hop, context=trace.set_span_in_context(parent),
                             kind=SpanKind.CLIENT, attributes={names.HOP: hop})  # budget: record_hop
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as error:
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        raise
    finally:
        span.end()
        otel_context.detach(token)


def record_hop(span: trace.Span, elapsed_ms: float, budget_ms: float, over_budget: bool) -> None:
    span.set_attributes({names.ELAPSED_MS: elapsed_ms, names.BUDGET_MS: budget_ms, names.OVER_BUDGET: over_budget})
