"""The gateway over real in-process channels: real template and cache services,
in-process fakes for the tokenizer and inference (unit scope: no model)."""
from __future__ import annotations

import asyncio
import uuid

from nlpmesh.gateway.v1 import gateway_pb2_grpc

from gateway.__main__ import build_spec as gateway_spec
from gateway.settings import GatewaySettings
from services.cache.servicer import build_spec as cache_spec
from services.cache.settings import CacheSettings
from services.template.servicer import build_spec as template_spec
from services.template.settings import TemplateSettings
from tests.budget_policy import roomy_budgets
from tests.servicer.fakes import FakeInference, FakeTokenizer, fake_spec


def run_mesh(inprocess_server, redis_url: str, scenario, key_prefix: str | None = None, template=None,
             pass_channel: bool = False, cache_redis_url: str | None = None, inference: FakeInference | None = None,
             **gateway_settings):
    """Starts template, cache, fake tokenizer and inference, then the gateway; runs scenario(stub, fakes).

    ``key_prefix``: where answers are cached; by default one of this call's own, so no test
    finds another's answers in the shared Redis. ``template``: a fake template servicer
    instead of the real service. Auth is off unless ``auth="on"`` (with ``auth_keys_file``)
    is given. Budgets: the shipped policy with roomy cache, template and tokenizer hops
    (``tests/budget_policy.py``) unless ``budgets_file`` is given. ``pass_channel``: the scenario gets the gateway's channel in place of a stub
    (to call it with metadata of its own). ``cache_redis_url``: the cache service's own
    Redis URL (default: ``redis_url``, the gateway's). ``inference``: a fake inference of the
    test's own (e.g. one that reports a capacity) in place of a plain ``FakeInference()``.
    """
    key_prefix = key_prefix or f"test:gw-{uuid.uuid4().hex}"
    gateway_settings.setdefault("auth", "off")
    gateway_settings.setdefault("budgets_file", roomy_budgets())
    tokenizer, inference = FakeTokenizer(), inference or FakeInference()
    template_service = template_spec(TemplateSettings()) if template is None else fake_spec("tpl", template)

    async def main():
        async with (
            inprocess_server(template_service, TemplateSettings()) as template,
            inprocess_server(cache_spec(CacheSettings(redis_url=cache_redis_url or redis_url, key_prefix=key_prefix)),
                             CacheSettings()) as cache,
            inprocess_server(fake_spec("tok", tokenizer), GatewaySettings()) as tok,
            inprocess_server(fake_spec("inf", inference), GatewaySettings()) as inf,
        ):
            settings = GatewaySettings(
                template_addr=template.address, cache_addr=cache.address, tokenizer_addr=tok.address,
                inference_addr=inf.address, redis_url=redis_url, key_prefix=key_prefix, **gateway_settings,
            )
            async with inprocess_server(gateway_spec(settings), settings) as gateway:
                first = gateway.channel if pass_channel else gateway_pb2_grpc.GatewayStub(gateway.channel)
                return await scenario(first, tokenizer, inference)

    return asyncio.run(main())
