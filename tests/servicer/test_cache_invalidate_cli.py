"""`nlpmesh cache invalidate` against the real cache service: one tenant's entries, or every tenant's."""
import asyncio

from nlpmesh.cache.v1 import cache_pb2, cache_pb2_grpc

from cli.invalidate import invalidate
from services.cache.servicer import build_spec
from tests.servicer.test_cache_servicer import ANSWER, settings_for, template_key


def test_invalidate_one_tenants_template_then_every_tenants(inprocess_server, redis_server):
    settings = settings_for(redis_server)

    async def main():
        async with inprocess_server(build_spec(settings), settings) as cache:
            stub = cache_pb2_grpc.CacheServiceStub(cache.channel)
            for tenant in ("acme", "globex"):
                assert (await stub.Store(cache_pb2.StoreRequest(key=template_key(tenant=tenant), answer=ANSWER,
                                                                ttl_s=30))).stored
            # The CLI's channel is synchronous: run it off the loop that serves the call.
            only_acme = await asyncio.to_thread(invalidate, cache.address, template_id="capital", tenant="acme")
            globex = await stub.Lookup(cache_pb2.LookupRequest(key=template_key(tenant="globex")))
            every = await asyncio.to_thread(invalidate, cache.address, template_id="capital")
            return only_acme, globex.hit, every

    assert asyncio.run(main()) == (1, True, 1)
