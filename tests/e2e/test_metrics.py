"""Prometheus /metrics from every service, scraped over HTTP from real processes."""
from __future__ import annotations

import time
import urllib.request

import pytest
from google.protobuf import struct_pb2
from nlpmesh.gateway.v1 import gateway_pb2
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.e2e, pytest.mark.model]

SERVICES = ("gateway", "template", "tokenizer", "cache", "inference")
QUESTION = "What does a central bank do? (metrics test)"


def question_request() -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": QUESTION})
    return gateway_pb2.GenerateRequest(
        template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=8),
        cache_mode=gateway_pb2.CACHE_MODE_USE,
    )


class Scrape:
    """One service's /metrics, parsed."""

    def __init__(self, url: str):
        with urllib.request.urlopen(url, timeout=5) as reply:
            self.text = reply.read().decode()
        self.samples = [s for family in text_string_to_metric_families(self.text) for s in family.samples]

    def value(self, name: str, **labels) -> float | None:
        for s in self.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return None

    def total(self, name: str, **labels) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(mesh, service: str) -> Scrape:
    return Scrape(mesh.metrics_url(service))


@pytest.fixture(scope="module")
def served(mesh, gateway):
    """One generated answer, then the same question twice from the cache (Redis, then the near tier)."""
    first = gateway.Generate(question_request(), timeout=120)
    assert not first.cache_hit
    deadline = time.monotonic() + 10
    while scrape(mesh, "cache").total("nlpmesh_cache_stores_total", result="stored") < 1:  # stored off-path
        assert time.monotonic() < deadline, "the answer was never stored"
        time.sleep(0.1)
    assert gateway.Generate(question_request(), timeout=30).cache_hit
    assert gateway.Generate(question_request(), timeout=30).cache_hit
    return {name: scrape(mesh, name) for name in SERVICES}


def test_the_launcher_gives_every_service_its_own_metrics_port(mesh):
    assert sorted(mesh.metrics_ports) == sorted(SERVICES)
    assert len(set(mesh.metrics_ports.values())) == len(SERVICES)
    assert not set(mesh.metrics_ports.values()) & set(mesh.ports.values())


def test_every_service_exports_its_rpc_latency_histogram(served):
    for name, metrics in served.items():
        assert metrics.total("nlpmesh_rpc_duration_seconds_count", service=name) >= 1, name
        assert metrics.total("nlpmesh_rpc_handled_total", service=name, code="OK") >= 1, name
    gateway = served["gateway"]
    assert gateway.value("nlpmesh_rpc_handled_total", service="gateway", method="Generate", code="OK") == 3
    assert served["template"].value("nlpmesh_rpc_duration_seconds_count", service="template", method="Render") == 1


def test_the_gateway_exports_a_latency_histogram_for_each_hop_it_made(served):
    gateway = served["gateway"]
    for hop in ("template", "tokenizer", "inference", "inference.ttft"):
        assert gateway.value("nlpmesh_hop_latency_seconds_count", hop=hop) == 1, hop
    assert gateway.value("nlpmesh_hop_latency_seconds_count", hop="cache") == 3
    for hop in ("cache", "template", "tokenizer", "inference"):
        assert gateway.value("nlpmesh_hop_over_budget_total", hop=hop) is not None, hop


def test_cache_hits_are_counted_by_tier_and_the_miss_by_reason(served):
    gateway = served["gateway"]
    assert gateway.value("nlpmesh_cache_misses_total", reason="absent") == 1
    assert gateway.value("nlpmesh_cache_hits_total", tier="redis") == 1
    assert gateway.value("nlpmesh_cache_hits_total", tier="near") == 1
    assert served["cache"].value("nlpmesh_cache_stores_total", result="stored") == 1


def test_inference_exports_ttft_rate_tokens_and_load_gauges(served):
    inference = served["inference"]
    assert inference.value("nlpmesh_inference_time_to_first_token_seconds_count") >= 1
    assert inference.value("nlpmesh_inference_tokens_per_second_count") >= 1
    assert inference.value("nlpmesh_inference_completion_tokens_total") >= 2
    assert inference.value("nlpmesh_inference_queue_depth") == 0
    assert inference.value("nlpmesh_inference_active_sequences") == 0


def test_no_label_carries_request_content(served):
    for name, metrics in served.items():
        assert QUESTION not in metrics.text, name
        assert "finance_question" not in metrics.text, name
