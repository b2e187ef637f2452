"""What the tracing and metrics interceptors share: wrapping each served call, and the status it ended with."""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

import grpc

_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}

# Health checks and reflection are the platform's calls, not a request's.
PLATFORM_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each registered method's handler once (``wrap``), platform calls left alone.

    Only methods a servicer registered are wrapped, so a caller cannot mint
    per-method state by calling made-up methods.
    """

    def __init__(self):
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PLATFORM_METHODS):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


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


def observed(handler: grpc.RpcMethodHandler, begin: Callable[[object], object],
             end: Callable[[object, grpc.StatusCode], None]) -> grpc.RpcMethodHandler:
    """The handler with ``state = begin(context)`` before each call and ``end(state, code)`` after it.

    Used by the server interceptors that trace and time every call; ``code``
    is the status the call ended with (a cancel or a passed deadline included).
    """
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=_observed_call(handler.unary_unary, begin, end))
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=_observed_call(handler.stream_unary, begin, end))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=_observed_stream(handler.unary_stream, begin, end))
    return handler._replace(stream_stream=_observed_stream(handler.stream_stream, begin, end))


def _observed_call(behavior, begin, end):
    async def call(request, context):
        state = begin(context)
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await behavior(request, context)
            code = final_code(context, grpc.StatusCode.OK)
            return response
        except asyncio.CancelledError:
            code = stopped_code(context)
            raise
        except BaseException:
            code = final_code(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            end(state, code)

    return call


def _observed_stream(behavior, begin, end):
    if not inspect.isasyncgenfunction(behavior):
        return _observed_call(behavior, begin, end)  # a handler that writes with context.write()

    async def stream(request, context):
        state = begin(context)
        code = grpc.StatusCode.UNKNOWN
        try:
            async for message in behavior(request, context):
                yield message
            code = final_code(context, grpc.StatusCode.OK)
        except (asyncio.CancelledError, GeneratorExit):
            code = stopped_code(context)
            raise
        except BaseException:
            code = final_code(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            end(state, code)

    return stream
