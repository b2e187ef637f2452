"""The process's tracer provider: where spans go and how their ids are picked.

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

import contextvars
import os
from contextlib import contextmanager
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

from meshkit import span_names as names
from meshkit.tracing.content_free import ContentFreeExporter
from meshkit.tracing.span_file import span_file_exporter


def configure_tracing(service: str, trace_dir: str | os.PathLike = "", capture_content: bool = False) -> trace.Tracer:
    """Installs the SDK tracer provider for this process and returns the service's tracer.

    Spans leave without exception messages unless ``capture_content``
    (meshkit/tracing/content_free.py).

    Call once, from ``main()``: the provider is process-wide, and a second
    call keeps the first one's. The provider flushes its exporters at exit.
    """
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(resource=Resource.create({names.SERVICE_NAME: names.SERVICE_PREFIX + service}),
                                  id_generator=None if _sdk_disabled() else ChosenIds())
        if not _sdk_disabled():
            for exporter in _exporters(service, trace_dir):
                exporter = exporter if capture_content else ContentFreeExporter(exporter)
                provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    return tracer(service)


def tracer(service: str) -> trace.Tracer:
    """The service's tracer; before ``configure_tracing`` it records nothing."""
    return trace.get_tracer(tracer_name(service))


def tracer_name(service: str) -> str:
    return f"nlpmesh.{service}"


class ChosenIds(IdGenerator):
    """Random ids, except while ``chosen`` holds ids picked earlier: then those.

    The tracing interceptor picks a served call's ids when the call starts and
    makes its SDK span, with those ids, only after the reply (``StandInSpan``).
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
