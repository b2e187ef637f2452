"""The public gateway servicer: protobuf at the edge, the Answerer inside."""
from __future__ import annotations

import uuid
from contextlib import contextmanager

from google.protobuf import json_format
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from meshkit.errors import InvalidArgument, Unavailable
from meshkit.server import rpc_method
from meshkit.tracing.propagation import trace_id_hex
from meshkit.tracing.server_span import request_span
from services.gateway.answer import Answerer, CallContext, Outcome
from services.gateway.downstream import TokenDelta
from services.gateway.request import CacheMode, Chat, PromptRequest, Sampling, TemplateCall, validate
from services.gateway.template_index import TemplateIndex
from services.gateway.timings import HopClock, HopTiming, server_timing

REQUEST_ID = "x-request-id"
_MAX_REQUEST_ID = 128


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, templates: TemplateIndex, tracer, settings):
        self._answerer: Answerer | None = None
        self._templates = templates
        self._tracer = tracer
        self._settings = settings

    def attach(self, answerer: Answerer) -> None:
        """Called once the internal services answer (the gateway's warm-up)."""
        self._answerer = answerer

    @property
    def answerer(self) -> Answerer:
        if self._answerer is None:
            raise Unavailable("the gateway is starting")
        return self._answerer

    @rpc_method
    async def Generate(self, request, context):
        with self._request(context, "Generate") as (call, clock, trace_id):
            prompt_request = prompt_request_from_pb(request)
            await _send_request_id(context)
            parts: list[str] = []
            async for event in self.answerer.stream(prompt_request, call, clock):
                if isinstance(event, TokenDelta):
                    parts.append(event.text)
                else:
                    context.set_trailing_metadata((("server-timing", server_timing(event.timings)),))
                    return gateway_pb2.GenerateResponse(
                        text="".join(parts), finish_reason=event.finish_reason, usage=_usage(event),
                        cache_hit=event.cache_hit, model=event.model, trace_id=trace_id,
                        timings=_timings_pb(event.timings),
                    )
        return gateway_pb2.GenerateResponse(trace_id=trace_id)

    @rpc_method
    async def GenerateStream(self, request, context):
        with self._request(context, "GenerateStream") as (call, clock, trace_id):
            prompt_request = prompt_request_from_pb(request)
            await _send_request_id(context)
            async for event in self.answerer.stream(prompt_request, call, clock):
                if isinstance(event, TokenDelta):
                    yield gateway_pb2.GenerateChunk(delta=event.text)
                elif isinstance(event, Outcome):
                    context.set_trailing_metadata((("server-timing", server_timing(event.timings)),))
                    yield gateway_pb2.GenerateChunk(
                        done=True, finish_reason=event.finish_reason, usage=_usage(event),
                        cache_hit=event.cache_hit, model=event.model, trace_id=trace_id,
                        timings=_timings_pb(event.timings),
                    )

    @rpc_method
    async def CountTokens(self, request, context):
        with self._request(context, "CountTokens") as (call, clock, _):
            count, model = await self.answerer.count_tokens(prompt_from_pb(request), request.model, call, clock)
            return gateway_pb2.CountTokensResponse(prompt_tokens=count, model=model)

    @rpc_method
    async def ListTemplates(self, request, context):
        await self._templates.refresh()
        return gateway_pb2.ListTemplatesResponse(
            templates=[
                gateway_pb2.TemplateInfo(
                    id=t.id, version=t.version, description=t.description,
                    variables=[gateway_pb2.TemplateVariable(name=n, required=r, description=d)
                               for n, r, d in t.variables],
                )
                for t in self._templates.entries
            ]
        )

    @contextmanager
    def _request(self, context, name: str):
        # The server span the tracing interceptor opened is the request's span: hops hang from it.
        with request_span(self._tracer, context.invocation_metadata(), f"gateway.{name}") as span:
            call = CallContext(self._settings.tenant, context.time_remaining)
            yield call, HopClock(self._tracer, span), trace_id_hex(span)


async def _send_request_id(context) -> None:
    incoming = dict(context.invocation_metadata() or ()).get(REQUEST_ID)
    request_id = incoming if isinstance(incoming, str) and 0 < len(incoming) <= _MAX_REQUEST_ID else uuid.uuid4().hex
    await context.send_initial_metadata(((REQUEST_ID, request_id),))


def prompt_from_pb(request) -> TemplateCall | Chat:
    which = request.WhichOneof("prompt")
    if which == "template":
        variables = json_format.MessageToDict(request.template.variables)
        return TemplateCall(request.template.id, request.template.version, variables)
    if which == "chat":
        if not request.chat.messages:
            raise InvalidArgument.for_field("chat.messages", "must hold at least one message")
        return Chat(tuple((m.role, m.content) for m in request.chat.messages))
    raise InvalidArgument.for_field("prompt", "set either template or chat")


def prompt_request_from_pb(request: gateway_pb2.GenerateRequest) -> PromptRequest:
    s = request.sampling
    sampling = Sampling(
        max_new_tokens=s.max_new_tokens, temperature=round(s.temperature, 6), top_p=round(s.top_p, 6),
        top_k=s.top_k, seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop),
    )
    if request.cache_mode not in CacheMode._value2member_map_:
        raise InvalidArgument.for_field("cache_mode", f"unknown value {request.cache_mode}")
    return validate(PromptRequest(prompt_from_pb(request), request.model, sampling,
                                  CacheMode(request.cache_mode), request.budget_ms))


def _usage(outcome: Outcome) -> gateway_pb2.Usage:
    return gateway_pb2.Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens)


def _timings_pb(timings: list[HopTiming]) -> list[gateway_pb2.HopTiming]:
    return [
        gateway_pb2.HopTiming(hop=t.hop, elapsed_ms=t.elapsed_ms, budget_ms=t.budget_ms, over_budget=t.over_budget)
        for t in timings
    ]
