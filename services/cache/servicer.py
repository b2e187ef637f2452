"""The cache service's gRPC edge: protobuf in, promptcache objects, protobuf out."""
from __future__ import annotations

import logging

import grpc
from nlpmesh.cache.v1 import cache_pb2, cache_pb2_grpc

from meshkit.errors import InvalidArgument
from meshkit.redis_connect import redact_url
from meshkit.server import ServiceSpec, rpc_method
from promptcache.keys import PromptCacheKey
from promptcache.redis_tier import CachedAnswer, PromptCache, redis_client
from services.cache.settings import CacheSettings

log = logging.getLogger("nlpmesh.cache")

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: PromptCache):
        self.cache = cache

    @rpc_method
    async def Lookup(self, request, context):
        answer = await self.cache.lookup(PromptCacheKey.from_pb(request.key, "key"))
        if answer is None:
            return cache_pb2.LookupResponse(hit=False)
        return cache_pb2.LookupResponse(hit=True, answer=answer.to_pb())

    @rpc_method
    async def Store(self, request, context):
        key = PromptCacheKey.from_pb(request.key, "key")
        if not request.HasField("answer"):
            raise InvalidArgument.for_field("answer", "is required")
        stored = await self.cache.store(key, CachedAnswer.from_pb(request.answer), request.ttl_s or None)
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
