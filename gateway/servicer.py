"""The public gateway servicer: protobuf at the edge, the Answerer inside.

Every RPC first learns who calls (``_tenant``: the API key, before the request is
even read, so a caller without a key learns nothing else), checks the template and
model asked for against the key's scope (``_check_scope``: PERMISSION_DENIED before
any hop), then opens the request's one scope with that tenant. The listings show a
key only what its scope allows.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway import access_log
from gateway.answer import Answerer, Outcome
from gateway.auth import KeyFileAuth, OpenAccess
from gateway.downstream import TemplateEntry
from gateway.embeddings import EmbeddingRoute
from gateway.inference_stream import TokenDelta
from gateway.model_routes import ModelRoutes
from gateway.quotas import Quotas
from gateway.request import PromptRequest, TemplateCall, prompt_from_pb
from gateway.scope import RequestScopes
from gateway.template_index import TemplateIndex
from gateway.tenant import Tenant
from gateway.timings import HopTiming, server_timing
from meshkit.errors import Unavailable
from meshkit.request_log import bind_request_id, request_id_from
from meshkit.server import initial_metadata_meanwhile, rpc_method
from meshkit.tracing.propagation import trace_id_hex
from meshkit.tracing.server_span import request_span
from meshkit.wire import REQUEST_ID_HEADER, SERVER_TIMING_TRAILER


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, templates: TemplateIndex, scopes: RequestScopes, tracer, auth: KeyFileAuth | OpenAccess):
        self._answerer: Answerer | None = None
        self._quotas: Quotas | None = None
        self._models: ModelRoutes | None = None
        self._embeddings: EmbeddingRoute | None = None
        self._templates = templates
        self._scopes = scopes
        self._tracer = tracer
        self._auth = auth

    def attach(self, answerer: Answerer, quotas: Quotas, models: ModelRoutes,
               embeddings: EmbeddingRoute | None = None) -> None:
        """Called once the internal services answer (the gateway's warm-up)."""
        self._answerer, self._quotas, self._models = answerer, quotas, models
        self._embeddings = embeddings

    @property
    def answerer(self) -> Answerer:
        if self._answerer is None:
            raise Unavailable("the gateway is starting")
        return self._answerer

    @rpc_method
    async def Generate(self, request, context):
        started = time.perf_counter()
        tenant = self._tenant(context)
        prompt_request = self._prompt_request(request)
        self._check_scope(tenant, prompt_request.template_id, prompt_request.model)
        async with self._scope(context, tenant, "Generate", prompt_request.template_id, prompt_request.budget_ms,
                               started) as scope, _request_id_sent(context, scope.request_id):
            trace_id = trace_id_hex(scope.span)
            parts: list[str] = []
            logprobs: list = []
            async for event in self.answerer.stream(prompt_request, scope):
                if isinstance(event, TokenDelta):
                    parts.append(event.text)
                    logprobs += event.logprobs
                else:
                    self._note_outcome(event, prompt_request)
                    context.set_trailing_metadata(((SERVER_TIMING_TRAILER, server_timing(event.timings)),))
                    return gateway_pb2.GenerateResponse(
                        text="".join(parts), finish_reason=event.finish_reason, usage=_usage_to_pb(event),
                        cache_hit=event.cache_hit, model=event.model, trace_id=trace_id,
                        timings=_timings_to_pb(event.timings),
                        token_logprobs=_logprobs_to_pb([*logprobs, *event.logprobs]),
                    )
            return gateway_pb2.GenerateResponse(trace_id=trace_id)

    @rpc_method
    async def GenerateStream(self, request, context):
        started = time.perf_counter()
        tenant = self._tenant(context)
        prompt_request = self._prompt_request(request)
        self._check_scope(tenant, prompt_request.template_id, prompt_request.model)
        async with self._scope(context, tenant, "GenerateStream", prompt_request.template_id, prompt_request.budget_ms,
                               started) as scope, _request_id_sent(context, scope.request_id) as sent:
            trace_id = trace_id_hex(scope.span)
            async for event in self.answerer.stream(prompt_request, scope):
                await sent  # the headers before the first message
                if isinstance(event, TokenDelta):
                    yield gateway_pb2.GenerateChunk(delta=event.text, token_logprobs=_logprobs_to_pb(event.logprobs))
                elif isinstance(event, Outcome):
                    self._note_outcome(event, prompt_request)
                    context.set_trailing_metadata(((SERVER_TIMING_TRAILER, server_timing(event.timings)),))
                    yield gateway_pb2.GenerateChunk(
                        done=True, finish_reason=event.finish_reason, usage=_usage_to_pb(event),
                        cache_hit=event.cache_hit, model=event.model, trace_id=trace_id,
                        timings=_timings_to_pb(event.timings), token_logprobs=_logprobs_to_pb(event.logprobs),
                    )

    @rpc_method
    async def CountTokens(self, request, context):
        started = time.perf_counter()
        tenant = self._tenant(context)
        prompt = prompt_from_pb(request)
        template_id = prompt.id if isinstance(prompt, TemplateCall) else None
        access_log.note(model=request.model, **_template_fields(prompt))
        self._check_scope(tenant, template_id, request.model)
        async with self._scope(context, tenant, "CountTokens", template_id, 0, started) as scope, \
                _request_id_sent(context, scope.request_id):
            count, model = await self.answerer.count_tokens(prompt, request.model, scope)
            access_log.note(model=model, prompt_tokens=count)
            return gateway_pb2.CountTokensResponse(prompt_tokens=count, model=model)

    @rpc_method
    async def ListTemplates(self, request, context):
        scope = self._tenant(context).scope
        async with _request_id_sent(context, request_id_from(context.invocation_metadata())):
            await self._templates.refresh()
            return gateway_pb2.ListTemplatesResponse(
                templates=[_template_info(t) for t in self._templates.entries if scope.allows_template(t.id)]
            )

    @rpc_method
    async def ListModels(self, request, context):
        scope = self._tenant(context).scope
        async with _request_id_sent(context, request_id_from(context.invocation_metadata())):
            if self._models is None:
                raise Unavailable("the gateway is starting")
            listed = [gateway_pb2.ModelInfo(id=m.id, revision=m.revision, context_length=m.context_length,
                                            engine=m.engine, ready=m.ready, default=m.default, task="generation")
                      for m in self._models.listing() if scope.allows_model(m.id)]
            embedding = self._embeddings.model if self._embeddings is not None else None
            if embedding is not None and scope.allows_model(embedding.id):
                listed.append(gateway_pb2.ModelInfo(id=embedding.id, revision=embedding.revision,
                                                    context_length=embedding.max_tokens, engine="builtin", ready=True,
                                                    default=True, task="embedding"))
            return gateway_pb2.ListModelsResponse(models=listed)

    @rpc_method
    async def Embed(self, request, context):
        started = time.perf_counter()
        tenant = self._tenant(context)
        access_log.note(model=request.model)
        if self._embeddings is None:
            raise Unavailable("the gateway is starting")
        self._embeddings.check_texts(request.texts)
        model_id = self._embeddings.model_id(request.model)
        tenant.scope.check_model(model_id)
        async with self._scope(context, tenant, "Embed", None, request.budget_ms, started) as scope, \
                _request_id_sent(context, scope.request_id):
            embedded = await self._embeddings.embed(list(request.texts), model_id, scope)
            timings = scope.finish()
            access_log.note(model=embedded.model, prompt_tokens=embedded.prompt_tokens)
            context.set_trailing_metadata(((SERVER_TIMING_TRAILER, server_timing(timings)),))
            response = embedded.response
            response.usage.prompt_tokens = embedded.prompt_tokens
            response.trace_id = trace_id_hex(scope.span)
            response.timings.extend(_timings_to_pb(timings))
            return response

    def _tenant(self, context) -> Tenant:
        """The caller's tenant, from its API key; UNAUTHENTICATED without a valid one.

        Health and reflection are other gRPC services, never gated here.
        """
        tenant = self._auth.tenant_for(context.invocation_metadata())
        access_log.note(tenant=tenant.id)
        return tenant

    @staticmethod
    def _prompt_request(request) -> PromptRequest:
        if request.WhichOneof("prompt") == "template":  # noted before validation: a refused call says it too
            access_log.note(template_id=request.template.id, template_version=request.template.version)
        access_log.note(model=request.model)
        return PromptRequest.from_pb(request)

    def _note_outcome(self, outcome: Outcome, request: PromptRequest) -> None:
        template = request.prompt
        version = (self._templates.known_version(template.id, template.version)
                   if isinstance(template, TemplateCall) else None)
        access_log.note(model=outcome.model, cache_hit=outcome.cache_hit, prompt_tokens=outcome.prompt_tokens,
                        completion_tokens=outcome.completion_tokens,
                        **({"template_version": version} if version else {}))

    def _check_scope(self, tenant: Tenant, template_id: str | None, model: str) -> None:
        """PERMISSION_DENIED (ErrorInfo reason KEY_SCOPE) for a template or model outside the caller's key's scope,
        before any hop and before the quota counts the call."""
        tenant.scope.check_template(template_id)
        if tenant.scope.models is not None:
            model_id = self._models.model_id(model) if self._models is not None else None
            if model_id is None:
                raise Unavailable("the gateway is starting")
            tenant.scope.check_model(model_id)

    @asynccontextmanager
    async def _scope(self, context, tenant: Tenant, name: str, template_id: str | None, budget_ms: int,
                     started: float):
        # The server span the tracing interceptor opened is the request's span: hops hang from it.
        metadata = context.invocation_metadata()
        request_id = request_id_from(metadata)
        access_log.note(request_id=request_id)
        with bind_request_id(request_id), request_span(self._tracer, metadata, f"gateway.{name}") as span:
            if self._quotas is None:
                raise Unavailable("the gateway is starting")
            # Once per request, after the key named the tenant and before any hop; RESOURCE_EXHAUSTED
            # with QuotaFailure and RetryInfo when the tenant is over a limit.
            async with await self._quotas.admit(tenant) as quota_lease:
                scope = self._scopes.open(quota_lease=quota_lease, span=span, request_id=request_id,
                                          template_id=template_id, budget_ms=budget_ms,
                                          time_left=context.time_remaining, started=started)
                access_log.note(hops=scope.hops)  # the hops done by the end, failures included
                yield scope


def _request_id_sent(context, request_id: str):
    """The request id, sent in the initial metadata while the request's hops start (``await`` the block's
    value before a stream's message)."""
    access_log.note(request_id=request_id)
    return initial_metadata_meanwhile(context, ((REQUEST_ID_HEADER, request_id),))


def _template_fields(prompt) -> dict[str, str]:
    """The template a prompt names (id and version as called, empty = newest), for the access line."""
    return {"template_id": prompt.id, "template_version": prompt.version} if isinstance(prompt, TemplateCall) else {}


def _usage_to_pb(outcome: Outcome) -> gateway_pb2.Usage:
    return gateway_pb2.Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens)


def _logprobs_to_pb(logprobs) -> list[gateway_pb2.TokenLogprob]:
    """The inference service's TokenLogprob messages as the gateway's: the same fields and numbers."""
    return [gateway_pb2.TokenLogprob.FromString(one.SerializeToString()) for one in logprobs]


def _timings_to_pb(timings: list[HopTiming]) -> list[gateway_pb2.HopTiming]:
    return [
        gateway_pb2.HopTiming(hop=t.hop, elapsed_ms=t.elapsed_ms, budget_ms=t.budget_ms, over_budget=t.over_budget)
        for t in timings
    ]


def _template_info(entry: TemplateEntry) -> gateway_pb2.TemplateInfo:
    info = gateway_pb2.TemplateInfo(
        id=entry.id, version=entry.version, description=entry.description,
        variables=[gateway_pb2.TemplateVariable(name=n, required=r, description=d) for n, r, d in entry.variables],
    )
    if entry.response_format is not None:
        entry.response_format.to_pb(info.response_format)
    return info
