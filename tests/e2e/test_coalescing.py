"""Request coalescing through the real mesh: real processes, a private Redis, the real model.

Identical concurrent requests cost one generation, as the inference service's own /metrics count it
(``nlpmesh_inference_requests_finished_total``), within one gateway and across two gateways sharing Redis.
The figures measured are printed with a ``[coalescing]`` prefix.
"""
from __future__ import annotations

import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.variants import spawn_gateway
from tests.e2e.streams import finance_request
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

FINISHED = "nlpmesh_inference_requests_finished_total"
COALESCED = "nlpmesh_gateway_coalesced_requests_total"
MAX_NEW_TOKENS = 24


def say(line: str) -> None:
    print(f"[coalescing] {line}", flush=True)


def counter(mesh, service: str, name: str) -> float:
    with urllib.request.urlopen(mesh.metrics_url(service), timeout=5) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return sum(s.value for family in families for s in family.samples if s.name == name)


def identical_request() -> gateway_pb2.GenerateRequest:
    """A greedy request no other test asks, read from and written to the prompt cache."""
    return finance_request(MAX_NEW_TOKENS, f"What does a bond coupon pay? (coalescing {uuid.uuid4().hex[:8]})",
                           cache_mode=gateway_pb2.CACHE_MODE_USE)


def timed(stub, request) -> tuple[gateway_pb2.GenerateResponse, float]:
    began = time.perf_counter()
    reply = stub.Generate(request, timeout=120)
    return reply, time.perf_counter() - began


def all_at_once(calls) -> list[tuple[gateway_pb2.GenerateResponse, float]]:
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def generations_since(mesh, before: float) -> float:
    """What the inference service finished since ``before``, once the count stops moving (it counts after
    its caller has the answer)."""
    wait_until(lambda: counter(mesh, "inference", FINISHED) > before, what="the generation to be counted")
    time.sleep(0.5)
    return counter(mesh, "inference", FINISHED) - before


def roles(replies) -> list[str]:
    """Each reply's part: it generated ("leader"), or shared another's generation ("coalesced")."""
    found = []
    for reply in replies:
        hops = {t.hop for t in reply.timings}
        found.append("coalesced" if "coalesced" in hops else "leader" if "inference" in hops else "other")
    return found


def test_ten_identical_concurrent_requests_cost_one_generation(mesh, gateway):
    request = identical_request()
    before = counter(mesh, "inference", FINISHED)
    coalesced_before = counter(mesh, "gateway", COALESCED)
    results = all_at_once([lambda: timed(gateway, request)] * 10)
    replies = [reply for reply, _ in results]
    generated = generations_since(mesh, before)
    leader_s = next(s for (reply, s), role in zip(results, roles(replies)) if role == "leader")
    slowest_s = max(s for _, s in results)
    say(f"10 identical requests: {generated:g} generation(s), roles {sorted(roles(replies))}, "
        f"leader {leader_s * 1000:.0f} ms, slowest {slowest_s * 1000:.0f} ms")
    assert generated == 1
    assert sorted(roles(replies)) == ["coalesced"] * 9 + ["leader"]
    assert len({reply.text for reply in replies}) == 1 and replies[0].text
    assert counter(mesh, "gateway", COALESCED) - coalesced_before == 9


def test_identical_requests_to_two_gateways_sharing_redis_cost_one_generation(mesh, gateway):
    process, address = spawn_gateway(mesh, {})
    try:
        with grpc.insecure_channel(address) as channel:
            second = gateway_pb2_grpc.GatewayStub(channel)
            request = identical_request()
            before = counter(mesh, "inference", FINISHED)
            results = all_at_once([lambda: timed(gateway, request)] * 4 + [lambda: timed(second, request)] * 4)
            generated = generations_since(mesh, before)
    finally:
        process.terminate()
        process.wait(timeout=10)
    replies = [reply for reply, _ in results]
    say(f"4 + 4 identical requests to two gateways: {generated:g} generation(s), roles {sorted(roles(replies))}, "
        f"slowest {max(s for _, s in results) * 1000:.0f} ms")
    assert generated == 1
    assert sorted(roles(replies)) == ["coalesced"] * 7 + ["leader"]
    assert len({reply.text for reply in replies}) == 1


def test_sampled_identical_requests_each_generate(mesh, gateway):
    request = identical_request()
    request.sampling.temperature = 0.8  # no seed: not deterministic, never shared
    before = counter(mesh, "inference", FINISHED)
    replies = [reply for reply, _ in all_at_once([lambda: timed(gateway, request)] * 3)]
    wait_until(lambda: counter(mesh, "inference", FINISHED) - before >= 3, what="three generations counted")
    assert roles(replies) == ["leader"] * 3
