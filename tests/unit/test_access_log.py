"""The access line and the per-call line: their fields, in both log formats, from plain objects."""
from __future__ import annotations

import contextvars
import io
import json
import logging

import grpc
import pytest

from gateway import access_log
from gateway.access_log import AccessLogInterceptor
from gateway.hop import Hop
from gateway.timings import HopTiming
from meshkit.call_log import CallLogInterceptor
from meshkit.request_log import log_handler, text_fields


class CallContext:
    """What the interceptors read of a served call's context."""

    def __init__(self, request_id: str | None = "req-7"):
        self._metadata = (("x-request-id", request_id),) if request_id else ()

    def invocation_metadata(self):
        return self._metadata


@pytest.fixture
def logged():
    """What the access and call loggers write, per format."""
    outs = {"json": io.StringIO(), "text": io.StringIO()}
    handlers = [log_handler(fmt, out) for fmt, out in outs.items()]
    loggers = [logging.getLogger(name) for name in ("nlpmesh.access", "nlpmesh.calls")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        for handler in handlers:
            logger.addHandler(handler)
    try:
        yield outs
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
            for handler in handlers:
                logger.removeHandler(handler)


def served(interceptor, method: str, code: grpc.StatusCode, context=None, **noted) -> None:
    """One call through ``interceptor``'s begin and end, noting ``noted`` on the way, in a context of its own."""
    def call():
        record = interceptor.begin(method, context or CallContext())
        access_log.note(**noted)
        interceptor.end(record, code)

    contextvars.copy_context().run(call)


def a_generation() -> dict:
    hops = [HopTiming(Hop.CACHE, 0.25, 5), HopTiming(Hop.TEMPLATE, 1.5, 100), HopTiming(Hop.TOTAL, 40.0, 2000)]
    return {"tenant": "acme", "model": "smollm2", "template_id": "finance_question", "template_version": "2",
            "cache_hit": False, "prompt_tokens": 31, "completion_tokens": 4, "hops": hops,
            "request_id": "req-made-by-gateway"}


def test_an_access_line_in_json_has_every_field_as_a_key_of_its_own(logged):
    served(AccessLogInterceptor(), "Generate", grpc.StatusCode.OK, **a_generation())
    line = json.loads(logged["json"].getvalue())
    assert line["level"] == "INFO" and line["logger"] == "nlpmesh.access" and line["message"] == "access"
    assert line["ts"] and line["request_id"] == "req-made-by-gateway" and line["trace_id"] == "-"
    assert {key: line[key] for key in ("method", "status", "tenant", "model", "template", "template_version",
                                       "cache", "prompt_tokens", "completion_tokens")} == {
        "method": "Generate", "status": "OK", "tenant": "acme", "model": "smollm2", "template": "finance_question",
        "template_version": "2", "cache": "miss", "prompt_tokens": 31, "completion_tokens": 4}
    assert line["hops"] == {"cache": 0.25, "template": 1.5}  # the total is total_ms, measured around the call
    assert line["total_ms"] >= 0


def test_an_access_line_in_text_is_one_line_of_name_value_words(logged):
    served(AccessLogInterceptor(), "Generate", grpc.StatusCode.OK, **a_generation())
    text = logged["text"].getvalue()
    assert text.count("\n") == 1
    assert ("nlpmesh.access: access method=Generate status=OK tenant=acme model=smollm2 template=finance_question "
            "template_version=2 cache=miss prompt_tokens=31 completion_tokens=4 hops=cache:0.25,template:1.5 "
            "total_ms=") in text
    assert text.rstrip().endswith("request_id=req-made-by-gateway trace_id=-")


def test_a_refused_call_says_its_status_and_what_was_known_and_dashes_for_the_rest(logged):
    served(AccessLogInterceptor(), "Generate", grpc.StatusCode.NOT_FOUND, template_id="no_such", tenant="acme")
    line = json.loads(logged["json"].getvalue())
    assert (line["status"], line["template"], line["tenant"]) == ("NOT_FOUND", "no_such", "acme")
    assert (line["model"], line["template_version"], line["cache"], line["hops"]) == ("-", "-", "-", {})
    assert line["request_id"] == "req-7"  # the caller's, when the gateway made no other


def test_a_call_refused_before_any_id_was_made_has_none(logged):
    served(AccessLogInterceptor(), "ListModels", grpc.StatusCode.UNAUTHENTICATED, CallContext(request_id=None))
    line = json.loads(logged["json"].getvalue())
    assert (line["status"], line["request_id"], line["tenant"]) == ("UNAUTHENTICATED", "-", "-")


@pytest.mark.parametrize(("noted", "cache"), [
    ({"cache_hit": True}, "hit"),
    ({"cache_hit": False, "hops": [HopTiming(Hop.COALESCED, 12.0, 900)]}, "coalesced"),
    ({"cache_hit": False}, "miss"),
    ({}, "-"),
])
def test_the_cache_field_says_hit_miss_or_shared_with_an_identical_request(logged, noted, cache):
    served(AccessLogInterceptor(), "Generate", grpc.StatusCode.OK, **noted)
    assert json.loads(logged["json"].getvalue())["cache"] == cache


def test_noting_outside_a_logged_call_does_nothing():
    contextvars.copy_context().run(access_log.note, tenant="acme")  # no record bound: no error, nothing kept


def test_each_call_notes_on_its_own_record(logged):
    interceptor = AccessLogInterceptor()
    served(interceptor, "Generate", grpc.StatusCode.OK, tenant="first")
    served(interceptor, "Generate", grpc.StatusCode.OK)
    lines = [json.loads(line) for line in logged["json"].getvalue().splitlines()]
    assert [line["tenant"] for line in lines] == ["first", "-"]


def test_an_internal_services_call_line_is_at_debug_with_method_status_time_and_ids(logged):
    interceptor = CallLogInterceptor()
    assert interceptor.enabled() and interceptor.level == logging.DEBUG
    served(interceptor, "Render", grpc.StatusCode.INVALID_ARGUMENT)
    line = json.loads(logged["json"].getvalue())
    assert (line["level"], line["logger"], line["message"]) == ("DEBUG", "nlpmesh.calls", "call")
    assert (line["method"], line["status"], line["request_id"]) == ("Render", "INVALID_ARGUMENT", "req-7")
    assert set(line) == {"ts", "level", "logger", "message", "request_id", "trace_id", "method", "status",
                         "total_ms"}


def test_the_call_line_is_off_unless_its_level_is_on():
    logger = logging.getLogger("test.access_log.quiet")
    logger.setLevel(logging.INFO)
    assert not CallLogInterceptor(logging.DEBUG, logger).enabled()


def test_a_text_value_with_a_space_or_quote_stays_one_word():
    assert text_fields({"tenant": "a b", "model": "", "n": 3}) == 'tenant="a b" model="" n=3'
