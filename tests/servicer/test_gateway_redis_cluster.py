"""The gateway and the cache service over a real 3-master Redis Cluster (tests/redis_cluster.py).

Both services get only the ``redis+cluster://`` URL, as their settings would from
the environment; real template and cache services, fake tokenizer and inference
(tests/servicer/gateway_mesh.py). Invalidation goes through ``nlpmesh cache
invalidate``'s code (cli/invalidate.py) to the cache service.
"""
import asyncio
import uuid

import pytest
import redis
from google.protobuf import struct_pb2
from nlpmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from nlpmesh.gateway.v1 import gateway_pb2

from cli.invalidate import invalidate
from services.cache.servicer import build_spec
from services.cache.settings import CacheSettings
from tests.polling import until
from tests.redis_cluster import RedisCluster, running_redis_cluster
from tests.servicer.gateway_mesh import run_mesh
from tests.servicer.test_cache_servicer import ANSWER, template_key

pytestmark = pytest.mark.redis  # a Redis Cluster of its own


@pytest.fixture(scope="module")
def cluster() -> RedisCluster:
    with running_redis_cluster() as running:
        yield running


def finance(question: str = "What is a bond?") -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": question})
    return gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
                                       sampling=gateway_pb2.SamplingParams(max_new_tokens=3),
                                       cache_mode=gateway_pb2.CACHE_MODE_USE)


def entries(cluster: RedisCluster, prefix: str) -> list[bytes]:
    with cluster.client() as admin:
        return list(admin.scan_iter(match=f"{prefix}:*:e:*", target_nodes=redis.cluster.RedisCluster.PRIMARIES))


def subscribers(cluster: RedisCluster, channel: str) -> int:
    total = 0
    for port in cluster.ports:
        with cluster.node_client(port) as node:
            total += sum(count for _, count in node.pubsub_numsub(channel))
    return total


def test_a_miss_is_stored_on_the_cluster_hit_next_and_gone_after_an_invalidation(inprocess_server, cluster):
    prefix = f"test:gw-{uuid.uuid4().hex[:12]}"
    questions = [f"What is a bond, take {n}?" for n in range(6)]

    async def scenario(stub, tokenizer, inference):
        misses = [await stub.Generate(finance(question), timeout=10) for question in questions]
        stored = await until(lambda: len(entries(cluster, prefix)) == len(questions) and entries(cluster, prefix),
                             what="every answer stored on the cluster")
        calls = inference.calls
        hits = [await stub.Generate(finance(question), timeout=10) for question in questions]
        hit_calls = inference.calls - calls
        # Invalidate through the cache service: the gateway's near tier hears of it over the cluster's pub/sub.
        await until(lambda: subscribers(cluster, f"{prefix}:invalidations") >= 1, timeout_s=10,
                    what="the gateway's near tier subscribed on the cluster")
        admin = CacheSettings(redis_url=cluster.url, key_prefix=prefix)
        async with inprocess_server(build_spec(admin), admin) as cache:
            removed = await asyncio.to_thread(invalidate, cache.address, template_id="finance_question")
        again = await stub.Generate(finance(questions[0]), timeout=10)
        return misses, stored, hits, hit_calls, removed, again

    misses, stored, hits, hit_calls, removed, again = run_mesh(inprocess_server, cluster.url, scenario,
                                                               key_prefix=prefix)
    assert not any(miss.cache_hit for miss in misses)
    assert all(hit.cache_hit and hit.text == miss.text for hit, miss in zip(hits, misses))
    assert hit_calls == 0
    # One tenant, one template: its answers share a slot (its invalidation is one transaction).
    assert len({cluster.node_of(entry) for entry in stored}) == 1
    assert removed == len(questions)
    assert not again.cache_hit  # neither Redis nor the near tier kept it


def test_the_invalidate_cli_removes_every_tenants_entries_across_masters(inprocess_server, cluster):
    settings = CacheSettings(port=0, redis_url=cluster.url, key_prefix=f"test:{uuid.uuid4().hex[:12]}")
    tenants = [f"tenant-{n}" for n in range(8)]

    async def main():
        async with inprocess_server(build_spec(settings), settings) as cache:
            stub = cache_pb2_grpc.CacheServiceStub(cache.channel)
            for tenant in tenants:
                assert (await stub.Store(cache_pb2.StoreRequest(key=template_key(tenant=tenant), answer=ANSWER,
                                                                ttl_s=60))).stored
            stored = entries(cluster, settings.key_prefix)
            only_first = await asyncio.to_thread(invalidate, cache.address, template_id="capital", tenant=tenants[0])
            second = await stub.Lookup(cache_pb2.LookupRequest(key=template_key(tenant=tenants[1])))
            every = await asyncio.to_thread(invalidate, cache.address, template_id="capital")
            first = await stub.Lookup(cache_pb2.LookupRequest(key=template_key(tenant=tenants[0])))
            by_model = await asyncio.to_thread(invalidate, cache.address, model="m1")
            stats = await stub.Stats(cache_pb2.StatsRequest())
            return stored, only_first, second.hit, every, first.hit, by_model, stats

    stored, only_first, second_hit, every, first_hit, by_model, stats = asyncio.run(main())
    assert len(stored) == len(tenants)
    assert len({cluster.node_of(entry) for entry in stored}) > 1  # tenants spread over the masters
    assert (only_first, second_hit, every, first_hit, by_model) == (1, True, len(tenants) - 1, False, 0)
    assert entries(cluster, settings.key_prefix) == []
    assert stats.stores == len(tenants)
