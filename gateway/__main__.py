"""`python -m gateway`: the public gateway process."""
from __future__ import annotations

import asyncio
import logging
import time

from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.access_log import AccessLogInterceptor
from gateway.answer import Answerer
from gateway.auth import authenticator
from gateway.budgets import BudgetPolicy
from gateway.downstream import Downstream
from gateway.downstream_health import CACHE_PATH, DownstreamHealth
from gateway.embeddings import EmbeddingRoute
from gateway.model_routes import ModelRoutes
from gateway.quotas import Quotas
from gateway.scope import RequestScopes
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from gateway.template_index import TemplateIndex
from meshkit.errors import MeshError
from meshkit.server import ServiceSpec, run
from meshkit.tracing.provider import configure_tracing, tracer
from modelfiles.catalogue import load_catalogue
from promptcache.near_tier import NearCache
from promptcache.redis_tier import PromptCache, redis_client

log = logging.getLogger("nlpmesh.gateway")


def build_spec(settings: GatewaySettings) -> ServiceSpec:
    policy = BudgetPolicy.load(settings.budgets_file)  # a bad file stops the start
    catalogue = load_catalogue()
    models = ModelRoutes.from_settings(settings, catalogue)  # so does a default model not routed to
    downstream = Downstream(settings, models.pools, longest_call_s=policy.longest_total_ms / 1000)
    embeddings = EmbeddingRoute(downstream, catalogue, settings)
    templates = TemplateIndex(lambda: downstream.list_templates(settings.template_timeout_s),
                              settings.catalog_refresh_s)
    gateway_tracer = tracer("gateway")
    auth = authenticator(settings)
    servicer = GatewayServicer(templates, RequestScopes(policy, gateway_tracer), gateway_tracer, auth)
    state: dict = {}

    async def warm_up() -> None:
        auth.start()  # the keys file is watched from now on, while the services warm up
        await downstream.open()
        embeddings.start()  # learnt in the background: Embed is UNAVAILABLE until its replicas answer
        # Serving starts with the default model; the others are served as each answers.
        default = models.default
        await _until_ready("inference", lambda: default.model_info(settings.inference_timeout_s),
                           settings.ready_timeout_s)
        models.learn_in_background([pool for pool in models.pools if pool is not default],
                                   settings.inference_timeout_s)
        await _until_ready("template", templates.refresh, settings.ready_timeout_s)
        await downstream.connected(settings.ready_timeout_s)
        await default.connected(settings.ready_timeout_s)
        cache = _prompt_cache(settings)
        if cache is not None:
            await cache.warm_up()
        state["cache"] = cache
        state["quotas"] = _quotas(settings)
        await state["quotas"].warm_up()
        state["answerer"] = Answerer(downstream, cache, templates, models, settings)
        servicer.attach(state["answerer"], state["quotas"], models, embeddings)

    async def close() -> None:
        await auth.close()
        if "quotas" in state:
            await state["quotas"].close()
        if "answerer" in state:
            await state["answerer"].drain()
        if state.get("cache") is not None:
            await state["cache"].close()
        await models.close()
        await embeddings.close()
        await downstream.close()

    return ServiceSpec(
        name="gateway",
        service_names=(gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,),
        register=lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
        warm_up=warm_up,
        close=close,
        health_names=(CACHE_PATH,),
        call_log=AccessLogInterceptor() if settings.access_log else None,
        watch_health=lambda health: DownstreamHealth(
            lambda: {**downstream.required_channels(), "inference": models.default.channel},
            settings.health_checks(), models).watch(health),
    )


def _quotas(settings: GatewaySettings) -> Quotas:
    if not settings.redis_url:
        log.warning("no REDIS_URL: tenant quotas are enforced per replica (limit / %d)", settings.quota_replicas)
        return Quotas(None, settings.quota_settings())
    return Quotas(redis_client(settings.redis_url), settings.quota_settings())


def _prompt_cache(settings: GatewaySettings) -> PromptCache | NearCache | None:
    if not settings.redis_url:
        log.warning("no REDIS_URL: running without a prompt cache")
        return None
    cache = PromptCache(redis_client(settings.redis_url), settings.key_prefix, ttl_s=3600,
                        timeout_s=settings.cache_lookup_timeout_s)
    if settings.near_cache_bytes <= 0:
        return cache
    near = NearCache(cache, settings.near_cache_bytes, settings.near_cache_max_age_s)
    near.start()
    return near


async def _until_ready(name: str, probe, timeout_s: float):
    """Retries ``probe`` until the service answers; the gateway stays NOT_SERVING meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await probe()
        except MeshError as error:
            if time.monotonic() > deadline:
                raise
            log.info("waiting for %s (%s)", name, type(error).__name__)
            await asyncio.sleep(0.5)


def main() -> None:
    settings = GatewaySettings.load()
    configure_tracing("gateway", settings.trace_dir, settings.capture_content)
    run(build_spec, settings)


if __name__ == "__main__":
    main()
