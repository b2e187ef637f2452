"""The whole mesh as real processes with every service's Redis a real 3-master Redis Cluster.

The launcher gives each service the cluster's ``redis+cluster://`` URL (as
``REDIS_URL`` would); the cluster is started by tests/redis_cluster.py.
"""
from __future__ import annotations

import grpc
import pytest
import redis
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from cli.invalidate import invalidate
from tests.e2e.conftest import started_mesh
from tests.e2e.test_mesh import FINANCE, finance_request, unique
from tests.polling import wait_until
from tests.redis_cluster import RedisCluster, running_redis_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.model]


@pytest.fixture(scope="module")
def cluster() -> RedisCluster:
    with running_redis_cluster() as running:
        yield running


@pytest.fixture(scope="module")
def cluster_mesh(tmp_path_factory, cluster):
    local = started_mesh(tmp_path_factory.mktemp("mesh-cluster"), cluster.url)
    yield local
    local.stop()


def keys(cluster: RedisCluster, pattern: str) -> list[bytes]:
    with cluster.client() as admin:
        return list(admin.scan_iter(match=pattern, target_nodes=redis.cluster.RedisCluster.PRIMARIES))


def test_answers_prefix_blocks_and_invalidation_live_on_the_cluster(cluster_mesh, cluster):
    question = unique(FINANCE)
    with grpc.insecure_channel(cluster_mesh.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = stub.Generate(finance_request(question), timeout=180)
        stored = wait_until(lambda: keys(cluster, "nlpmesh:pc:*:e:*"), timeout_s=30, what="the answer on the cluster")
        second = stub.Generate(finance_request(question), timeout=60)
        # The same template again (its head's blocks seen a second time): they go to the cluster.
        stub.Generate(finance_request(unique(FINANCE), cache_mode=gateway_pb2.CACHE_MODE_BYPASS), timeout=180)
        blocks = wait_until(lambda: [k for k in keys(cluster, "nlpmesh:kv:*") if b":seen:" not in k], timeout_s=30,
                            what="prefix-KV blocks on the cluster")
        removed = invalidate(cluster_mesh.address("cache"), template_id="finance_question")
        after = stub.Generate(finance_request(question), timeout=180)
    assert not first.cache_hit and second.cache_hit and second.text == first.text
    assert len(stored) == 1
    assert len({cluster.node_of(block) for block in blocks}) == 1  # one chain: one slot, one MGET
    assert removed == 1
    assert not after.cache_hit and after.text == first.text  # recomputed after the invalidation: greedy, the same
