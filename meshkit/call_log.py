"""One log line per served call: its method, the status it ended with, how long it took, and its ids.

Every service gets a ``CallLogInterceptor`` at DEBUG (``meshkit.server.create_server``): with
``LOG_LEVEL=DEBUG`` an internal service says which calls of a request it served. The gateway's
access log (gateway/access_log.py) is the same line at INFO, with what the gateway knows of the
request besides.

Only names, codes, counts and ids: never a request's or a reply's content, nor a status message
(one can quote a field's value).
"""
from __future__ import annotations

import logging
import time

import grpc
from opentelemetry import trace

from meshkit.interceptor import ObservingInterceptor, observed
from meshkit.request_log import FIELDS, NO_ID, incoming_request_id

log = logging.getLogger("nlpmesh.calls")


class ServedCall:
    """What one call's line says; a subclass adds fields (``fields``)."""

    __slots__ = ("began", "method", "request_id", "trace_id")

    def __init__(self, method: str, context):
        self.began = time.perf_counter()
        self.method = method
        self.request_id = incoming_request_id(context.invocation_metadata()) or NO_ID
        # The tracing interceptor, outside this one, made the call's span current.
        span_context = trace.get_current_span().get_span_context()
        self.trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else NO_ID

    def fields(self, code: grpc.StatusCode, total_ms: float) -> dict:
        return {"method": self.method, "status": code.name, "total_ms": round(total_ms, 3)}


class CallLogInterceptor(ObservingInterceptor):
    """Logs one line per served call, at ``level``, when the call ends (a cancel or a passed deadline included).

    Health checks and reflection are left out (``ObservingInterceptor``).
    """

    call_type: type[ServedCall] = ServedCall
    message = "call"

    def __init__(self, level: int = logging.DEBUG, logger: logging.Logger = log):
        super().__init__()
        self.level = level
        self.logger = logger

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(self.level)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        name = method.rsplit("/", 1)[-1]
        return observed(handler, lambda context: self.begin(name, context), self.end)

    def begin(self, method: str, context) -> ServedCall:
        return self.call_type(method, context)

    def end(self, call: ServedCall, code: grpc.StatusCode) -> None:
        total_ms = (time.perf_counter() - call.began) * 1000.0
        self.logger.log(self.level, self.message, extra={
            FIELDS: call.fields(code, total_ms), "request_id": call.request_id, "trace_id": call.trace_id})
