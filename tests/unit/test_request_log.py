"""Request identity in log lines: the filter, the two formats, the id's bounds, the setting."""
from __future__ import annotations

import contextvars
import io
import json
import logging
import sys
import threading
from datetime import datetime

import pytest
from opentelemetry import trace
from pydantic import ValidationError

from meshkit.request_log import (
    NO_ID,
    RequestIdentityFilter,
    bind_request_id,
    current_request_id,
    incoming_request_id,
    log_handler,
    request_id_from,
    request_id_metadata,
    served_call_scope,
)
from meshkit.settings import ServiceSettings

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN = trace.NonRecordingSpan(trace.SpanContext(TRACE_ID, 0x00F067AA0BA902B7, is_remote=False))


class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestIdentityFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured():
    logger = logging.getLogger("test.request_log.captured")
    handler = Captured()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger, handler.records
    finally:
        logger.removeHandler(handler)


def logging_to(log_format: str, capture_content: bool = False) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    logger = logging.getLogger(f"test.request_log.{log_format}.{id(out)}")
    logger.addHandler(log_handler(log_format, out, capture_content=capture_content))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, out


def test_a_line_logged_inside_a_bound_request_id_carries_it(captured):
    logger, records = captured
    with bind_request_id("req-42"):
        logger.info("inside")
    assert records[0].request_id == "req-42"


def test_a_line_logged_outside_any_request_carries_a_dash(captured):
    logger, records = captured
    with bind_request_id("req-42"):
        pass
    logger.info("after")
    assert (records[0].request_id, records[0].trace_id) == (NO_ID, NO_ID)


def test_bound_ids_nest_and_each_scope_restores_the_one_before():
    with bind_request_id("outer"):
        with bind_request_id("inner"):
            assert current_request_id() == "inner"
        assert current_request_id() == "outer"
    assert current_request_id() == NO_ID


def test_an_id_passed_in_extra_wins_over_the_bound_one(captured):
    logger, records = captured
    with bind_request_id("bound"):
        logger.info("from the worker", extra={"request_id": "passed"})
    assert records[0].request_id == "passed"


def test_a_worker_thread_sees_no_bound_id_but_extra_carries_it(captured):
    logger, records = captured

    def work():
        logger.info("no id")
        logger.info("with id", extra={"request_id": "req-7"})

    with bind_request_id("req-7"):
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    assert [r.request_id for r in records] == [NO_ID, "req-7"]


def test_the_trace_id_is_the_current_span_s_in_hex(captured):
    logger, records = captured
    with trace.use_span(SPAN):
        logger.info("traced")
    assert records[0].trace_id == "0af7651916cd43dd8448eb211c80319c"


def test_the_text_format_keeps_the_message_and_adds_both_ids():
    logger, out = logging_to("text")
    with bind_request_id("req-1"), trace.use_span(SPAN):
        logger.info("tokens counted: %d", 12)
    line = out.getvalue().rstrip("\n")
    assert f"INFO {logger.name}: tokens counted: 12 request_id=req-1 trace_id={TRACE_ID:032x}" in line
    assert "\n" not in line


def test_json_lines_parse_and_have_every_key():
    logger, out = logging_to("json")
    with bind_request_id("req-1"), trace.use_span(SPAN):
        logger.warning("slow hop: %s", "template")
    logger.info("between requests")
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first == {"ts": first["ts"], "level": "WARNING", "logger": logger.name, "message": "slow hop: template",
                     "request_id": "req-1", "trace_id": f"{TRACE_ID:032x}"}
    assert datetime.fromisoformat(first["ts"]).utcoffset().total_seconds() == 0
    assert (second["request_id"], second["trace_id"]) == (NO_ID, NO_ID)


def test_an_exception_s_traceback_is_in_exc_on_the_same_line():
    logger, out = logging_to("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("bug in handler")
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "bug in handler"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert "builtins.RuntimeError" in record["exc"] and "raise RuntimeError" in record["exc"]


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_traceback_keeps_no_exception_message_unless_content_is_captured(log_format):
    secret = "-".join(("canary", "value"))  # built, so that no source line in the traceback holds it

    def fail():
        try:
            {}[secret]
        except KeyError as error:
            raise ValueError(secret) from error

    withheld, captured = logging_to(log_format), logging_to(log_format, capture_content=True)
    for logger, _ in (withheld, captured):
        try:
            fail()
        except ValueError:
            logger.exception("bug in handler")
    for (_, out), shown in ((withheld, False), (captured, True)):
        text = out.getvalue()
        assert ("canary-value" in text) is shown, text
        assert "KeyError" in text and "ValueError" in text and "direct cause" in text


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="yaml"):
        log_handler("yaml")


@pytest.mark.parametrize("value, expected", [
    ("abc-123", "abc-123"),
    ("x" * 128, "x" * 128),
    ("x" * 129, None),
    ("", None),
    ("has space", None),
    ("caf\u00e9", None),
    ("tab\tin", None),
    (b"bytes", None),
])
def test_only_a_bounded_visible_ascii_id_is_taken_from_metadata(value, expected):
    assert incoming_request_id((("traceparent", "00-x"), ("x-request-id", value))) == expected


def test_a_missing_or_invalid_id_gets_a_fresh_one():
    given = request_id_from((("x-request-id", "mine"),))
    fresh = {request_id_from(None), request_id_from((("x-request-id", "x" * 200),))}
    assert given == "mine"
    assert len(fresh) == 2
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in fresh)


def test_the_bound_id_goes_downstream_as_metadata_and_none_without_one():
    with bind_request_id("req-5"):
        assert request_id_metadata() == (("x-request-id", "req-5"),)
    assert request_id_metadata() == ()


def test_a_served_call_without_an_id_does_not_inherit_one():
    with bind_request_id("earlier"), served_call_scope(()):
        assert current_request_id() == NO_ID


class LoggingSettings(ServiceSettings, service="logdemo"):
    pass


def test_the_format_is_a_setting_per_service(monkeypatch):
    assert LoggingSettings().log_format == "text"
    monkeypatch.setenv("NLPMESH_LOGDEMO_LOG_FORMAT", "json")
    assert LoggingSettings().log_format == "json"
    monkeypatch.setenv("NLPMESH_LOGDEMO_LOG_FORMAT", "xml")
    with pytest.raises(ValidationError):
        LoggingSettings()


def test_configure_logging_puts_the_ids_on_the_root_handler(monkeypatch):
    # basicConfig only configures a root logger without handlers: pytest's are set aside, and put back.
    from meshkit.server import configure_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    root.handlers.clear()
    try:
        configure_logging("info", "json")
        with bind_request_id("req-9"):
            logging.getLogger("grpc.somewhere").info("third-party line")
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    [line] = stderr.getvalue().splitlines()
    record = json.loads(line)
    assert (record["logger"], record["request_id"], record["trace_id"]) == ("grpc.somewhere", "req-9", NO_ID)


def test_a_scope_closed_in_another_context_leaves_that_context_alone():
    # As when the loop's generator finaliser closes an abandoned streaming handler.
    scope = bind_request_id("abandoned")
    contextvars.copy_context().run(scope.__enter__)
    scope.__exit__(None, None, None)
    assert current_request_id() == NO_ID
