"""Prompts and answers stay out of exported spans and logged tracebacks unless capture_content is on."""
import logging

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshkit.content_capture import content_free_traceback, warn_if_capturing
from meshkit.tracing.content_free import ContentFreeExporter
from meshkit.tracing.span_file import span_line

CANARY = "canary-7f3a"


def spans_of_a_failing_span(exporter) -> list:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    try:
        with tracer.start_as_current_span("render"):
            raise KeyError(CANARY)
    except KeyError:
        pass
    return exporter


def test_an_exported_span_keeps_the_exception_type_but_not_its_message():
    memory = InMemorySpanExporter()
    spans_of_a_failing_span(ContentFreeExporter(memory))
    [span] = memory.get_finished_spans()
    [event] = span.events
    assert event.name == "exception" and event.attributes["exception.type"] == "KeyError"
    assert span.status.status_code == trace.StatusCode.ERROR and span.status.description == "KeyError"
    assert CANARY not in repr(span.to_json())


def test_without_the_wrapper_the_message_is_exported_so_the_check_above_can_fail():
    memory = InMemorySpanExporter()
    spans_of_a_failing_span(memory)
    [span] = memory.get_finished_spans()
    assert CANARY in span.to_json()
    assert CANARY in span_line(span)  # the span file writes events and the status description too


def test_a_span_without_events_or_description_is_exported_as_it_is():
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ContentFreeExporter(memory)))
    with provider.get_tracer("test").start_as_current_span("fine") as span:
        span.set_attribute("n", 1)
    [exported] = memory.get_finished_spans()
    assert exported.attributes["n"] == 1 and not exported.events


def test_a_content_free_traceback_names_each_type_in_the_chain_and_no_message():
    try:
        try:
            raise KeyError(CANARY)
        except KeyError:
            raise ValueError(CANARY + "-2")  # noqa: B904 (the implicit context is the point)
    except ValueError as error:
        text = content_free_traceback(error)
    assert CANARY not in text
    assert "builtins.KeyError" in text and "builtins.ValueError" in text
    assert "During handling of the above exception" in text


def test_capturing_is_announced_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="nlpmesh.content"):
        warn_if_capturing("gateway", False)
        assert not caplog.records
        warn_if_capturing("gateway", True)
    [record] = caplog.records
    assert record.levelname == "WARNING" and "capture_content is on" in record.getMessage()
