"""The gateway's hop metrics and the /metrics endpoint (values read from the default registry)."""
import urllib.request
from types import SimpleNamespace

from opentelemetry import trace
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.exposition import generate_latest

from gateway.budgets import BudgetPolicy, ObservedLatency, RequestBudget
from gateway.hop import Hop
from gateway.hop_metrics import observe_hop
from gateway.scope import RequestScope
from meshkit.metrics import start_metrics_server
from meshkit.settings import ServiceSettings
from tests.conftest import free_port


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_observe_hop_records_seconds_and_counts_overruns():
    hop = "test_hop_a"
    observe_hop(hop, elapsed_ms=4.0, budget_ms=10.0, over_budget=False)
    observe_hop(hop, elapsed_ms=25.0, budget_ms=10.0, over_budget=True)
    assert sample("nlpmesh_hop_latency_seconds_count", hop=hop) == 2
    assert abs(sample("nlpmesh_hop_latency_seconds_sum", hop=hop) - 0.029) < 1e-9
    assert sample("nlpmesh_hop_over_budget_total", hop=hop) == 1
    assert sample("nlpmesh_hop_budget_used_ratio_bucket", hop=hop, le="0.5") == 1  # 4 of 10 ms
    assert sample("nlpmesh_hop_budget_used_ratio_bucket", hop=hop, le="2.0") == 1
    assert sample("nlpmesh_hop_budget_used_ratio_bucket", hop=hop, le="5.0") == 2  # 2.5 times over


def test_a_hop_within_budget_exports_a_zero_overrun_count():
    observe_hop("test_hop_b", elapsed_ms=1.0, budget_ms=10.0, over_budget=False)
    assert REGISTRY.get_sample_value("nlpmesh_hop_over_budget_total", {"hop": "test_hop_b"}) == 0.0


def test_hop_buckets_tell_sub_millisecond_hops_from_multi_second_inference():
    hop = "test_hop_c"
    observe_hop(hop, elapsed_ms=0.3, budget_ms=0, over_budget=False)
    observe_hop(hop, elapsed_ms=7_000.0, budget_ms=0, over_budget=False)
    assert sample("nlpmesh_hop_latency_seconds_bucket", hop=hop, le="0.0005") == 1
    assert sample("nlpmesh_hop_latency_seconds_bucket", hop=hop, le="5.0") == 1
    assert sample("nlpmesh_hop_latency_seconds_bucket", hop=hop, le="10.0") == 2
    assert sample("nlpmesh_hop_budget_used_ratio_count", hop=hop) == 0  # no budget, no ratio


def test_the_metrics_endpoint_serves_the_registry_over_http():
    observe_hop("test_hop_http", elapsed_ms=2.0, budget_ms=1.0, over_budget=True)
    server = start_metrics_server(ServiceSettings(metrics_port=free_port()))
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'nlpmesh_hop_over_budget_total{hop="test_hop_http"} 1.0' in text
    assert 'nlpmesh_hop_latency_seconds_count{hop="test_hop_http"} 1.0' in text


def test_metrics_port_zero_opens_no_endpoint():
    assert start_metrics_server(ServiceSettings(metrics_port=0)) is None


def test_a_hop_exemplar_names_the_requests_trace_only_where_the_trace_is_sampled():
    # Under OTEL_TRACES_SAMPLER=parentbased_traceidratio most traces are not kept: an exemplar naming
    # one of those would send an SRE to a trace that does not exist.
    def scope(trace_id: int, flags: trace.TraceFlags) -> RequestScope:
        span = trace.NonRecordingSpan(trace.SpanContext(trace_id, 0x1234, is_remote=False, trace_flags=flags))
        observed = ObservedLatency()
        budget = RequestBudget(BudgetPolicy(1000.0, {str(h): 100.0 for h in Hop}), observed, None, 0)
        return RequestScope(SimpleNamespace(id="tenant"), "request", budget, span, trace.NoOpTracer(), observed,
                            None)

    kept, dropped = 0x5EED0000000000000000000000000001, 0x5EED0000000000000000000000000002
    for trace_id, flags in ((kept, trace.TraceFlags(trace.TraceFlags.SAMPLED)), (dropped, trace.TraceFlags(0))):
        with scope(trace_id, flags).hop(Hop.TOKENIZER):
            pass
        exposition = generate_latest(REGISTRY).decode()
        named = format(trace_id, "032x") in exposition
        assert named == (trace_id == kept)
