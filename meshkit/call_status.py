"""The status a served call ended with, as the tracing and metrics interceptors record it."""
from __future__ import annotations

import grpc

_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def final_code(context, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code the handler set (abort or set_code), else ``default``."""
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code
    return _BY_VALUE.get(code, default)


def stopped_code(context) -> grpc.StatusCode:
    """A call stopped from outside: the deadline passed, or the caller cancelled."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
