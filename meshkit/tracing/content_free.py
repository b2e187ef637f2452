"""Spans leave the process without exception messages (see ``meshkit.content_capture``).

The SDK records an exception that escapes a span as an ``exception`` event
whose ``exception.message`` and ``exception.stacktrace`` are the exception's
own text, and sets the span's status description to ``"<Type>: <message>"``.
A library's message may quote its input, so every exporter is wrapped in
``ContentFreeExporter``, one place for every span of every service, ours and
the libraries': it keeps the event's ``exception.type`` and the description's
type, and drops the rest. Only spans with an event or a status description are
copied; the others go out as they are.
"""
from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Status

_EXCEPTION_TEXT = ("exception.message", "exception.stacktrace")


class ContentFreeExporter(SpanExporter):
    def __init__(self, inner: SpanExporter):
        self._inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._inner.export([without_content(span) for span in spans])

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


def without_content(span: ReadableSpan) -> ReadableSpan:
    """The span with exception messages and stack traces removed."""
    description = span.status.description
    if not span.events and not description:
        return span
    return ReadableSpan(
        name=span.name, context=span.context, parent=span.parent, resource=span.resource,
        attributes=span.attributes, events=tuple(_event(e) for e in span.events), links=span.links,
        kind=span.kind, status=Status(span.status.status_code, description.split(":", 1)[0] if description else None),
        start_time=span.start_time, end_time=span.end_time, instrumentation_scope=span.instrumentation_scope,
    )


def _event(event: Event) -> Event:
    attributes = event.attributes or {}
    if not any(key in attributes for key in _EXCEPTION_TEXT):
        return event
    kept = {key: value for key, value in attributes.items() if key not in _EXCEPTION_TEXT}
    return Event(event.name, kept, event.timestamp)
