"""Request identity in log lines: each line says which request and which trace it belongs to.

The current request's id lives in a context variable, bound for the length of
each served call (``meshkit.server.rpc_method``) from the caller's
``x-request-id``. A filter on the root handler stamps every record with
``request_id`` and ``trace_id`` when, and only when, a line is logged.

Code that logs from a thread of its own (the inference engine's worker), where
context variables do not follow, passes the id itself:
``log.warning(..., extra={"request_id": request.request_id})``.

Only ids are added: nothing here reads or logs a request's text. A logged
traceback keeps its frames and exception types but not their messages, unless
``capture_content`` is on (``meshkit.content_capture``).
"""
from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterable
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Literal, TextIO

from opentelemetry import trace

from meshkit.content_capture import content_free_traceback
from meshkit.wire import REQUEST_ID_HEADER

NO_ID = "-"
LogFormat = Literal["text", "json"]

# Visible ASCII only, bounded: the id is copied into every line and sent on downstream.
# A space is refused too, so that the text format's fields stay one word each.
_VALID_ID = re.compile(r"[!-~]{1,128}")
_request_id: ContextVar[str] = ContextVar("nlpmesh.request_id", default=NO_ID)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s request_id=%(request_id)s trace_id=%(trace_id)s"
# A record's structured fields (``extra={FIELDS: {...}}``, e.g. an access log line's): after the message as
# ``name=value`` in the text format, keys of their own in the JSON one.
FIELDS = "fields"


def incoming_request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The caller's ``x-request-id`` when it is a valid id (1 to 128 visible ASCII characters), else None."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            return value if isinstance(value, str) and _VALID_ID.fullmatch(value) else None
    return None


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's valid ``x-request-id``, else a fresh one (uuid4, hex)."""
    return incoming_request_id(metadata) or uuid.uuid4().hex


def current_request_id() -> str:
    """The id bound in this context, or ``NO_ID``."""
    return _request_id.get()


def request_id_metadata() -> tuple[tuple[str, str], ...]:
    """The bound id as gRPC metadata for a downstream call; none when no id is bound."""
    request_id = _request_id.get()
    return () if request_id == NO_ID else ((REQUEST_ID_HEADER, request_id),)


class RequestIdScope:
    """Binds a request id for the length of a ``with`` block, then restores the one before."""

    __slots__ = ("_request_id", "_token")

    def __init__(self, request_id: str):
        self._request_id = request_id
        self._token: Token[str] | None = None

    def __enter__(self) -> str:
        self._token = _request_id.set(self._request_id)
        return self._request_id

    def __exit__(self, *exc) -> None:
        # Not contextlib.suppress: this runs on every served call, and that builds an object each time.
        try:  # noqa: SIM105
            _request_id.reset(self._token)
        except ValueError:
            # A streaming handler closed by the loop's generator finaliser runs in a
            # copy of the call's context: the copy dies with it, nothing to restore.
            pass


def bind_request_id(request_id: str) -> RequestIdScope:
    """``with bind_request_id(id):`` every line logged inside carries ``id``."""
    return RequestIdScope(request_id)


def served_call_scope(metadata: Iterable[tuple[str, str | bytes]] | None) -> RequestIdScope:
    """The scope of one served call: the caller's valid id, else ``NO_ID`` (never the id of a call before)."""
    return RequestIdScope(incoming_request_id(metadata) or NO_ID)


class RequestIdentityFilter(logging.Filter):
    """Stamps each record with ``request_id`` and ``trace_id``; drops nothing.

    An id the caller passed in ``extra`` wins over the context's.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        if not fields.get("request_id"):
            record.request_id = _request_id.get()
        if not fields.get("trace_id"):
            context = trace.get_current_span().get_span_context()
            record.trace_id = format(context.trace_id, "032x") if context.is_valid else NO_ID
        return True


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``; a traceback without exception messages unless ``capture_content``."""

    def __init__(self, capture_content: bool = False):
        super().__init__(TEXT_FORMAT)
        self.capture_content = capture_content

    def formatException(self, ei) -> str:
        return super().formatException(ei) if self.capture_content else content_free_traceback(ei[1])

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = getattr(record, FIELDS, None)
        if fields:
            record.message = f"{record.message} {text_fields(fields)}"
        return super().formatMessage(record)


def text_fields(fields: dict) -> str:
    """``name=value`` pairs, one word each: a value with a space or a quote is JSON-quoted; a dict is
    ``key:value`` pairs joined by commas."""
    return " ".join(f"{name}={_text_value(value)}" for name, value in fields.items())


def _text_value(value) -> str:
    if isinstance(value, dict):
        value = ",".join(f"{key}:{item}" for key, item in value.items())
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in "\"'" for c in text) else text


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: ts, level, logger, message, request_id, trace_id, exc,
    and the record's structured fields (``FIELDS``), each a key of its own.

    ``exc`` is a traceback without exception messages unless ``capture_content``.
    """

    def __init__(self, capture_content: bool = False):
        super().__init__()
        self.capture_content = capture_content

    def formatException(self, ei) -> str:
        return super().formatException(ei) if self.capture_content else content_free_traceback(ei[1])

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", NO_ID),
            "trace_id": getattr(record, "trace_id", NO_ID),
        }
        for name, value in (getattr(record, FIELDS, None) or {}).items():
            line.setdefault(name, value)  # never in place of the keys above
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def log_handler(log_format: LogFormat, stream: TextIO | None = None, capture_content: bool = False) -> logging.Handler:
    """A handler writing to ``stream`` (stderr) in ``log_format``, every record stamped with its ids."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdentityFilter())
    if log_format == "json":
        handler.setFormatter(JsonLineFormatter(capture_content))
    elif log_format == "text":
        handler.setFormatter(TextFormatter(capture_content))
    else:
        raise ValueError(f"log format {log_format!r}: use 'text' or 'json'")
    return handler
