"""Prometheus /metrics from every service, scraped over HTTP from real processes."""
from __future__ import annotations

import re
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from google.protobuf import struct_pb2
from nlpmesh.gateway.v1 import gateway_pb2
from prometheus_client.parser import text_string_to_metric_families

from meshkit.tracing.span_file import read_spans
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

SERVICES = ("gateway", "template", "tokenizer", "cache", "inference")
QUESTION = f"What does a central bank do? (metrics test {uuid.uuid4().hex[:8]})"  # answered by no other test


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


def scrape_all(mesh) -> dict[str, Scrape]:
    return {name: scrape(mesh, name) for name in SERVICES}


@dataclass
class Served:
    """Every service's metrics before and after the requests, and the first reply."""
    before: dict[str, Scrape]
    after: dict[str, Scrape]
    first: gateway_pb2.GenerateResponse

    def added(self, service: str, name: str, /, **labels) -> float:
        """What the requests added to a counter (summed over the series the labels select)."""
        return self.after[service].total(name, **labels) - self.before[service].total(name, **labels)


def added(mesh, before: dict[str, Scrape], service: str, name: str, /, **labels) -> float:
    return scrape(mesh, service).total(name, **labels) - before[service].total(name, **labels)


@pytest.fixture(scope="module")
def served(mesh, gateway):
    """One generated answer, then the same question twice from the cache (Redis, then the near tier).

    Counters are read as what these requests added, whatever the mesh served before.
    """
    before = scrape_all(mesh)
    first = gateway.Generate(question_request(), timeout=120)
    assert not first.cache_hit
    wait_until(lambda: added(mesh, before, "cache", "nlpmesh_cache_stores_total", result="stored") >= 1,
               what="the answer to be stored (off the caller's path)")
    assert gateway.Generate(question_request(), timeout=30).cache_hit
    assert gateway.Generate(question_request(), timeout=30).cache_hit
    # A server records a call after its caller has the answer.
    wait_until(lambda: added(mesh, before, "gateway", "nlpmesh_rpc_handled_total", method="Generate") >= 3,
               what="the gateway to record its three Generate calls")
    return Served(before, scrape_all(mesh), first)


def test_the_launcher_gives_every_service_its_own_metrics_port(mesh):
    # The OpenAI edge's (nlpmesh_edge_*) and the embedding replica's (nlpmesh_embedding_*) too.
    assert sorted(mesh.metrics_ports) == sorted((*SERVICES, "edge", "embedding"))
    assert len(set(mesh.metrics_ports.values())) == len(SERVICES) + 2
    assert not set(mesh.metrics_ports.values()) & set(mesh.ports.values())


def test_every_service_exports_its_rpc_latency_histogram(served):
    for name in SERVICES:
        assert served.added(name, "nlpmesh_rpc_duration_seconds_count", service=name) >= 1, name
        assert served.added(name, "nlpmesh_rpc_handled_total", service=name, code="OK") >= 1, name
    assert served.added("gateway", "nlpmesh_rpc_handled_total", service="gateway", method="Generate", code="OK") == 3
    assert served.added("template", "nlpmesh_rpc_duration_seconds_count", service="template", method="Render") == 1


def test_the_gateway_exports_a_latency_histogram_for_each_hop_it_made(served):
    for hop in ("template", "tokenizer", "inference", "inference.ttft"):
        assert served.added("gateway", "nlpmesh_hop_latency_seconds_count", hop=hop) == 1, hop
    assert served.added("gateway", "nlpmesh_hop_latency_seconds_count", hop="cache") == 3
    for hop in ("cache", "template", "tokenizer", "inference"):
        assert served.after["gateway"].value("nlpmesh_hop_over_budget_total", hop=hop) is not None, hop


def test_cache_hits_are_counted_by_tier_and_the_miss_by_reason(served):
    assert served.added("gateway", "nlpmesh_cache_misses_total", reason="absent") == 1
    assert served.added("gateway", "nlpmesh_cache_hits_total", tier="redis") == 1
    assert served.added("gateway", "nlpmesh_cache_hits_total", tier="near") == 1
    assert served.added("cache", "nlpmesh_cache_stores_total", result="stored") == 1


def test_inference_exports_ttft_rate_tokens_and_load_gauges(served):
    assert served.added("inference", "nlpmesh_inference_time_to_first_token_seconds_count") == 1
    assert served.added("inference", "nlpmesh_inference_tokens_per_second_count") == 1
    assert served.added("inference", "nlpmesh_inference_completion_tokens_total") == served.first.usage.completion_tokens
    inference = served.after["inference"]
    assert inference.value("nlpmesh_inference_queue_depth") == 0
    assert inference.value("nlpmesh_inference_active_sequences") == 0


def test_no_label_carries_request_content(served):
    for name, metrics in served.after.items():
        assert QUESTION not in metrics.text, name
        assert "finance_question" not in metrics.text, name


RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself, not a service


def rule_metric_names() -> set[str]:
    """Every metric name the rules read: identifiers before a selector or a range, not functions, recording
    rules' own names (with colons), or label names."""
    names = set()
    for path in RULES.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                expr = re.sub(r"\{[^}]*\}", "{}", rule["expr"])  # label matchers out
                names |= set(re.findall(r"(?<![:\w])(nlpmesh_[a-z0-9_]+|up)\b", expr))
    return names


def exported_families(scrape_text: str) -> set[str]:
    """The metric names a scrape declares (``# TYPE``), with a histogram's _bucket/_count/_sum and a counter's
    _total as Prometheus names them in queries."""
    found = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", scrape_text, re.MULTILINE):
        found.add(name)
        if kind == "histogram":
            found |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        if kind == "counter" and not name.endswith("_total"):
            found.add(f"{name}_total")
    return found


def test_every_metric_an_alert_rule_reads_exists_in_a_scrape_of_the_running_mesh(served):
    read = rule_metric_names() - PROMETHEUS_OWN
    assert {"nlpmesh_hop_over_budget_total", "nlpmesh_certificate_not_after_seconds"} <= read  # the parse works
    exported = set().union(*(exported_families(scrape.text) for scrape in served.after.values()))
    assert read - exported == set()


def test_hop_latency_buckets_carry_trace_ids_as_exemplars_that_name_real_traces(mesh, served):
    request = urllib.request.Request(mesh.metrics_url("gateway"),
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        text = reply.read().decode()
    exemplars = set(re.findall(r'^nlpmesh_hop_latency_seconds_bucket\{[^}]*\} \S+ # \{trace_id="([0-9a-f]{32})"\}',
                               text, re.MULTILINE))
    assert exemplars
    wait_until(lambda: exemplars & {s.trace_id for s in read_spans(mesh.trace_dir)}, timeout_s=10,
               what="an exemplar's trace in the span files")
