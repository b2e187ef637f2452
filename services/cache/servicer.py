"""The cache service's gRPC edge: protobuf in, keys.py/store.py objects, protobuf out."""
from __future__ import annotations

import logging

import grpc
from google.protobuf import json_format
from nlpmesh.cache.v1 import cache_pb2, cache_pb2_grpc

from meshkit.errors import FieldViolation, InvalidArgument
from meshkit.server import ServiceSpec, rpc_method
from promptcache.keys import ChatPrompt, PromptCacheKey, Sampling, TemplatePrompt
from promptcache.redis_tier import CachedAnswer, PromptCache, redact_url, redis_client
from services.cache.settings import CacheSettings

log = logging.getLogger("nlpmesh.cache")

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: PromptCache):
        self.cache = cache

    @rpc_method
    async def Lookup(self, request, context):
        answer = await self.cache.lookup(key_from_pb(request.key, "key"))
        if answer is None:
            return cache_pb2.LookupResponse(hit=False)
        return cache_pb2.LookupResponse(hit=True, answer=answer_to_pb(answer))

    @rpc_method
    async def Store(self, request, context):
        key = key_from_pb(request.key, "key")
        if not request.HasField("answer"):
            raise InvalidArgument.for_field("answer", "is required")
        stored = await self.cache.store(key, answer_from_pb(request.answer), request.ttl_s or None)
        return cache_pb2.StoreResponse(stored=stored)

    @rpc_method
    async def Invalidate(self, request, context):
        tenant = request.tenant or None
        scope = request.WhichOneof("scope")
        if scope == "template_id" and request.template_id:
            removed = await self.cache.invalidate_template(request.template_id, tenant)
        elif scope == "model" and request.model:
            removed = await self.cache.invalidate_model(request.model, tenant)
        else:
            raise InvalidArgument.for_field("scope", "set a non-empty template_id or model")
        return cache_pb2.InvalidateResponse(removed=removed)

    @rpc_method
    async def Stats(self, request, context):
        stats = await self.cache.stats()
        return cache_pb2.StatsResponse(hits=stats.hits, misses=stats.misses, stores=stats.stores)


def key_from_pb(parts: cache_pb2.CacheKeyParts, path: str) -> PromptCacheKey:
    """The domain key, or InvalidArgument naming every bad field under ``path``."""
    violations: list[FieldViolation] = []
    _require(violations, parts.model, f"{path}.model")
    _require(violations, parts.revision, f"{path}.revision")
    prompt = _prompt_from_pb(parts, path, violations)
    if violations:
        raise InvalidArgument("invalid cache key", violations)
    return PromptCacheKey(
        tenant=parts.tenant,
        model=parts.model,
        revision=parts.revision,
        prompt=prompt,
        sampling=_sampling_from_pb(parts.sampling),
    )


def _prompt_from_pb(parts, path: str, violations: list[FieldViolation]):
    kind = parts.WhichOneof("prompt")
    if kind == "template":
        template = parts.template
        _require(violations, template.id, f"{path}.template.id")
        _require(violations, template.version, f"{path}.template.version")
        variables = json_format.MessageToDict(template.variables)
        return TemplatePrompt(id=template.id, version=template.version, variables=variables)
    if kind == "chat":
        messages = parts.chat.messages
        if not messages:
            violations.append(FieldViolation(f"{path}.chat.messages", "must not be empty"))
        for i, message in enumerate(messages):
            _require(violations, message.role, f"{path}.chat.messages[{i}].role")
        return ChatPrompt(messages=tuple((m.role, m.content) for m in messages))
    violations.append(FieldViolation(f"{path}.prompt", "set template or chat"))
    return None


def _require(violations: list[FieldViolation], value: str, field: str) -> None:
    if not value:
        violations.append(FieldViolation(field, "must not be empty"))


def _sampling_from_pb(sampling: cache_pb2.Sampling) -> Sampling:
    return Sampling(
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
    )


def answer_to_pb(answer: CachedAnswer) -> cache_pb2.CachedAnswer:
    return cache_pb2.CachedAnswer(
        text=answer.text,
        finish_reason=answer.finish_reason,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        model=answer.model,
    )


def answer_from_pb(answer: cache_pb2.CachedAnswer) -> CachedAnswer:
    return CachedAnswer(
        text=answer.text,
        finish_reason=answer.finish_reason,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        model=answer.model,
    )


def build_spec(settings: CacheSettings) -> ServiceSpec:
    """The cache service. Call inside the running event loop (the Redis client binds to it)."""
    cache = PromptCache(
        redis_client(settings.redis_url),
        prefix=settings.key_prefix,
        ttl_s=settings.ttl_s,
        timeout_s=settings.timeout_s,
        max_answer_bytes=settings.max_answer_bytes,
    )

    def register(server: grpc.aio.Server) -> None:
        cache_pb2_grpc.add_CacheServiceServicer_to_server(CacheServicer(cache), server)

    async def warm_up() -> None:
        # Redis down degrades the cache to misses; it must not hold the mesh back.
        where = redact_url(settings.redis_url)
        if await cache.ping():
            log.info("prompt cache: Redis at %s reachable", where)
        else:
            log.warning("prompt cache: Redis at %s unreachable; every lookup will miss", where)

    return ServiceSpec(
        name="cache",
        service_names=(SERVICE_NAME,),
        register=register,
        warm_up=warm_up,
        close=cache.close,
    )
