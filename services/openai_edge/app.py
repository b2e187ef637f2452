"""The edge's HTTP routes (starlette): OpenAI's API in, the gateway's gRPC API out.

    POST /v1/chat/completions   Generate, or GenerateStream as server-sent events (stream: true)
    POST /v1/completions        the same, the prompt sent as one user message
    GET  /v1/models             ListModels
    POST /v1/embeddings         Embed
    GET  /healthz               the process is up (no gateway call)

Failures come back in OpenAI's error JSON ({"error": {"message", "type", "param", "code"}}), the gateway's status
mapped to its HTTP status (ERRORS); a RESOURCE_EXHAUSTED's RetryInfo becomes Retry-After. A failure after a stream
has begun is one last event carrying that JSON. A client that goes away cancels the gateway call, so the generation
stops.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid

import grpc
from nlpmesh_client import NlpmeshError, TokenLogprob
from nlpmesh_client.calls import VALID_REQUEST_ID
from prometheus_client import Counter, Histogram
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshkit.metrics import LATENCY_BUCKETS_S
from services.openai_edge import mapping
from services.openai_edge.gateway_calls import TRACE_HEADERS, Caller, Gateway
from services.openai_edge.mapping import BadRequest, Call

log = logging.getLogger("nlpmesh.edge")

# gRPC status -> (HTTP status, OpenAI error type, code)
ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", None),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", None),
}
INTERNAL = (500, "api_error", None)

REQUESTS = Counter("nlpmesh_edge_requests_total", "HTTP requests the edge answered, by route and status.",
                   ["route", "status"])
LATENCY = Histogram("nlpmesh_edge_request_duration_seconds",
                    "Time to an HTTP request's response (a stream: to its first chunk), by route.", ["route"],
                    buckets=LATENCY_BUCKETS_S)


class HttpError(Exception):
    """A refusal by the edge itself (before any gateway call)."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.code = status, kind, message, param, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def gateway_error(error: NlpmeshError) -> tuple[int, dict, dict[str, str]]:
    """The HTTP status, body and headers of a failed gateway call."""
    status, kind, code = ERRORS.get(error.code, INTERNAL)
    message = error.message if status != 500 else "internal error"
    param = error.field_violations[0][0] if error.field_violations else None
    headers = {"x-request-id": error.request_id} if error.request_id else {}
    if error.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after_s)))
    return status, error_body(message, kind, param, code), headers


def gateway_error_response(error: NlpmeshError) -> JSONResponse:
    status, body, headers = gateway_error(error)
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(gateway: Gateway, max_body_bytes: int) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gateway.open()
        try:
            yield
        finally:
            await gateway.close()

    async def chat_completions(request: Request) -> Response:
        return await _generation(request, mapping.chat_call)

    async def completions(request: Request) -> Response:
        return await _generation(request, mapping.completion_call)

    async def _generation(request: Request, parse) -> Response:
        try:
            who = caller(request)
            call = parse(mapping.parse_json(await read_body(request, max_body_bytes)))
        except BadRequest as bad:
            return JSONResponse(error_body(bad.message, "invalid_request_error", bad.param), status_code=400)
        except HttpError as refused:
            return JSONResponse(error_body(refused.message, refused.kind, refused.param, refused.code),
                                status_code=refused.status)
        if call.stream:
            return await _streamed(call, who)
        try:
            generation = await gateway.generate(call, who)
        except NlpmeshError as error:
            return gateway_error_response(error)
        prefix = "chatcmpl-" if call.chat else "cmpl-"
        return JSONResponse(mapping.answer(call, generation, prefix + generation.request_id),
                            headers={"x-request-id": generation.request_id,
                                     "server-timing": server_timing(generation.server_timing)})

    async def _streamed(call: Call, who: Caller) -> Response:
        stream = gateway.stream(call, who)
        chunks = stream.chunks()
        try:  # a refusal before the first chunk is an HTTP error, not a stream
            first = await anext(chunks)
        except NlpmeshError as error:
            return gateway_error_response(error)
        except StopAsyncIteration:
            first = None
        response_id = ("chatcmpl-" if call.chat else "cmpl-") + stream.request_id
        created = int(time.time())

        async def events():
            try:
                opened = False
                pending = [first] if first is not None else []
                async for chunk in _chained(pending, chunks):
                    if chunk.delta or chunk.token_logprobs or not opened:
                        logprobs = tuple(TokenLogprob.from_pb(one) for one in chunk.token_logprobs)
                        yield json.dumps(mapping.chunk(call, response_id, created, call.model, chunk.delta,
                                                       logprobs, first=not opened))
                        opened = True
                result = stream.result
                yield json.dumps(mapping.chunk(call, response_id, created, result.model, None,
                                               finish_reason=result.finish_reason))
                if call.include_usage:
                    yield json.dumps(mapping.usage_chunk(call, response_id, created, result))
                yield "[DONE]"
            except NlpmeshError as error:
                _, body, _ = gateway_error(error)
                yield json.dumps(body)
            finally:
                if stream.result is None:  # the client went away, or the stream failed: stop the generation
                    stream.cancel()

        return EventSourceResponse(events(), headers={"x-request-id": stream.request_id}, ping=15)

    async def create_embeddings(request: Request) -> Response:
        try:
            who = caller(request)
            call = mapping.embedding_call(mapping.parse_json(await read_body(request, max_body_bytes)))
        except BadRequest as bad:
            return JSONResponse(error_body(bad.message, "invalid_request_error", bad.param), status_code=400)
        except HttpError as refused:
            return JSONResponse(error_body(refused.message, refused.kind, refused.param, refused.code),
                                status_code=refused.status)
        try:
            response = await gateway.embed(call, who)
        except NlpmeshError as error:
            return gateway_error_response(error)
        if call.dimensions is not None and call.dimensions != response.dimensions:
            return JSONResponse(error_body(f"dimensions: model {response.model} gives {response.dimensions}; "
                                           "shortened vectors are not supported", "invalid_request_error",
                                           "dimensions"), status_code=400)
        return JSONResponse(mapping.embeddings(call, response), headers={"x-request-id": who.request_id})

    async def list_models(request: Request) -> Response:
        try:
            who = caller(request)
            listed = await gateway.list_models(who)
        except HttpError as refused:
            return JSONResponse(error_body(refused.message, refused.kind, refused.param, refused.code),
                                status_code=refused.status)
        except NlpmeshError as error:
            return gateway_error_response(error)
        return JSONResponse(mapping.models(listed))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}",
                                       kind), status_code=status)

    routes = [
        Route("/v1/chat/completions", measured("chat_completions", chat_completions), methods=["POST"]),
        Route("/v1/completions", measured("completions", completions), methods=["POST"]),
        Route("/v1/models", measured("models", list_models), methods=["GET"]),
        Route("/v1/embeddings", measured("embeddings", create_embeddings), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})


def measured(route: str, handler):
    latency = LATENCY.labels(route)

    async def handle(request: Request) -> Response:
        started = time.perf_counter()
        response = await handler(request)
        latency.observe(time.perf_counter() - started)
        REQUESTS.labels(route, str(response.status_code)).inc()
        return response

    return handle


async def _chained(first: list, rest):
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


def caller(request: Request) -> Caller:
    """The key (the Bearer token, forwarded as the same API key), the request id, the trace headers."""
    authorization = request.headers.get("authorization")
    key = None
    if authorization is not None:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise HttpError(401, "authentication_error", "authorization: expected 'Bearer <API key>'",
                            code="invalid_api_key")
        key = key.strip()
    request_id = request.headers.get("x-request-id")
    if request_id is not None and not VALID_REQUEST_ID.fullmatch(request_id):
        raise HttpError(400, "invalid_request_error", "x-request-id: 1 to 128 printable ASCII characters, no spaces")
    trace = tuple((name, request.headers[name]) for name in TRACE_HEADERS if name in request.headers)
    return Caller(key, request_id or uuid.uuid4().hex, trace)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it is past ``limit`` bytes (by its Content-Length, or as it arrives)."""
    length = request.headers.get("content-length", "")
    too_large = HttpError(413, "invalid_request_error", f"the body is over {limit} bytes", code="request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


def server_timing(timings) -> str:
    return ", ".join(f"{hop};dur={ms:.2f}" for hop, ms in timings.items())
