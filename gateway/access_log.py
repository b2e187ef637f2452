"""The access log: one INFO line per finished call at the gateway, for an SRE asked about one request.

The line says when, which request and trace, which tenant (its id, never its key), which method,
model and template (id and version), the status code, whether the prompt cache answered or the
answer was shared with an identical request, each hop's milliseconds, the tokens in and out, and the
total milliseconds. ``LOG_FORMAT=json`` makes each a key of its own (meshkit/request_log.py).

The servicer learns these as the call goes and ``note``s them on the call's ``AccessRecord``; the
interceptor writes the line when the call ends, with the status it ended with, failures included.
Never prompt or answer text, nor a status message (one can quote a field's value).
"""
from __future__ import annotations

import logging
from contextvars import ContextVar

import grpc

from gateway.hop import Hop
from gateway.timings import HopTiming
from meshkit.call_log import CallLogInterceptor, ServedCall

log = logging.getLogger("nlpmesh.access")

_current: ContextVar[AccessRecord | None] = ContextVar("nlpmesh.access_record", default=None)


class AccessRecord(ServedCall):
    """What the access line says of one call, filled in as the servicer learns it."""

    __slots__ = ("cache_hit", "completion_tokens", "hops", "model", "prompt_tokens", "template_id",
                 "template_version", "tenant")

    def __init__(self, method: str, context):
        super().__init__(method, context)
        self.tenant = self.model = self.template_id = self.template_version = ""
        self.cache_hit: bool | None = None  # None: no answer (yet)
        self.prompt_tokens = self.completion_tokens = 0
        self.hops: list[HopTiming] = []  # the request scope's own list: the hops done when the call ended

    def fields(self, code: grpc.StatusCode, total_ms: float) -> dict:
        return {
            "method": self.method, "status": code.name, "tenant": self.tenant or "-", "model": self.model or "-",
            "template": self.template_id or "-", "template_version": self.template_version or "-",
            "cache": self._cache(), "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "hops": {timing.hop: round(timing.elapsed_ms, 3) for timing in self.hops if timing.hop != Hop.TOTAL},
            "total_ms": round(total_ms, 3),
        }

    def _cache(self) -> str:
        if any(timing.hop == Hop.COALESCED for timing in self.hops):
            return "coalesced"
        if self.cache_hit is None:
            return "-"
        return "hit" if self.cache_hit else "miss"


class AccessLogInterceptor(CallLogInterceptor):
    """Writes the access line of every call the gateway serves (health checks and reflection aside)."""

    call_type = AccessRecord
    message = "access"

    def __init__(self):
        super().__init__(logging.INFO, log)

    def begin(self, method: str, context) -> AccessRecord:
        record = AccessRecord(method, context)
        # Bound in the call's own context: each served call runs in a task of its own.
        _current.set(record)
        return record


def note(**fields) -> None:
    """Sets ``fields`` on the current call's record; nothing without one (the access log off, a bare servicer)."""
    record = _current.get()
    if record is not None:
        for name, value in fields.items():
            setattr(record, name, value)
