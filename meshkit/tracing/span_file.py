"""The span-file format: ``<trace_dir>/<service>.jsonl``, one finished span per line.

Both sides of it live here. The services write it (``SpanFileExporter``, each
line made by ``span_line``); ``nlpmesh trace`` and ``nlpmesh budgets`` read it
back (``read_spans``, into ``SpanRecord``\\s). A line:

    {"trace_id": 32 hex, "span_id": 16 hex, "parent_id": 16 hex or null, "name", "service",
     "kind", "start_ns", "end_ns" (epoch nanoseconds), "status", "attributes": {...}}

and, only when the span has them, "status_description" and "events": [{"name", "time_ns",
"attributes"}], so that the file holds what an OTLP collector would get.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from meshkit import span_names as names

log = logging.getLogger("nlpmesh.tracing")


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
         '"start_ns":%d,"end_ns":%d,"status":"%s","attributes":%s%s}\n')


def span_line(span: ReadableSpan) -> str:
    """One span as one compact JSON line: ids in hex, times in epoch nanoseconds."""
    context, parent = span.context, span.parent
    return _LINE % (
        context.trace_id, context.span_id, '"%016x"' % parent.span_id if parent is not None else "null",
        _encode(span.name), _encode(span.resource.attributes.get(names.SERVICE_NAME, "")), span.kind.name,
        span.start_time, span.end_time, span.status.status_code.name, _encode(dict(span.attributes or {})),
        _extras(span) if span.events or span.status.description else "",
    )


def _extras(span: ReadableSpan) -> str:
    extras = ""
    if span.status.description:
        extras += ',"status_description":' + _encode(span.status.description)
    if span.events:
        events = [{"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})} for e in span.events]
        extras += ',"events":' + _encode(events)
    return extras


@dataclass(frozen=True)
class SpanRecord:
    """One line of a span file, read back."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    service: str
    kind: str
    start_ns: int
    end_ns: int
    status: str
    attributes: dict

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def hop(self) -> str | None:
        return self.attributes.get(names.HOP)

    @property
    def budget_ms(self) -> float:
        return float(self.attributes.get(names.BUDGET_MS) or 0.0)

    @property
    def elapsed_ms(self) -> float:
        """The hop's own measure of itself, else the span's duration."""
        elapsed = self.attributes.get(names.ELAPSED_MS)
        return float(elapsed) if elapsed is not None else self.duration_ms

    @property
    def over_budget(self) -> bool:
        return self.attributes.get(names.OVER_BUDGET) is True

    @property
    def short_service(self) -> str:
        return self.service.removeprefix(names.SERVICE_PREFIX)


def read_spans(trace_dir: Path) -> list[SpanRecord]:
    """Every span in the directory's ``*.jsonl`` files; a torn or foreign line is skipped."""
    spans = []
    for path in sorted(trace_dir.glob("*.jsonl")):
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                span = _parse_line(line)
                if span is not None:
                    spans.append(span)
    return spans


def _parse_line(line: str) -> SpanRecord | None:
    try:
        raw = json.loads(line)
        return SpanRecord(
            trace_id=str(raw["trace_id"]), span_id=str(raw["span_id"]), parent_id=raw.get("parent_id"),
            name=str(raw["name"]), service=str(raw.get("service", "")), kind=str(raw.get("kind", "")),
            start_ns=int(raw["start_ns"]), end_ns=int(raw["end_ns"]), status=str(raw.get("status", "")),
            attributes=dict(raw.get("attributes") or {}),
        )
    except (ValueError, KeyError, TypeError):
        return None
