"""A request that is not valid protobuf: INVALID_ARGUMENT with a plain message, on every service.

grpc's server parses a request before the handler runs, and a parse failure
(a truncated message, a string field with invalid UTF-8) comes back as UNKNOWN
naming the Python exception class. ``RequestDecodingInterceptor`` hands the
handler the raw bytes instead and parses them inside the call, where the
failure can be answered properly. Requests that stream in (only reflection's,
in this mesh) are left as grpc parses them.
"""
from __future__ import annotations

import inspect
import logging

import grpc

log = logging.getLogger("nlpmesh.server")

MALFORMED_REQUEST = "the request is not a valid protobuf message for this method"


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each registered unary-request method once, health and reflection included."""

    def __init__(self):
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _decoding_in_the_call(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _decoding_in_the_call(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer

    async def decoded(raw: bytes, context):
        try:
            return parse(raw)
        except Exception:  # DecodeError, UnicodeDecodeError, ...: the bytes, never a bug of ours
            log.info("malformed request to %s (%d bytes)", method, len(raw))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_REQUEST)

    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(raw, context):
            return await behavior(await decoded(raw, context), context)

        return handler._replace(request_deserializer=None, unary_unary=unary)

    behavior = handler.unary_stream
    if not inspect.isasyncgenfunction(behavior):  # a handler that writes with context.write() (health Watch)

        async def writing(raw, context):
            return await behavior(await decoded(raw, context), context)

        return handler._replace(request_deserializer=None, unary_stream=writing)

    async def streaming(raw, context):
        request = await decoded(raw, context)
        async for response in behavior(request, context):
            yield response

    return handler._replace(request_deserializer=None, unary_stream=streaming)
