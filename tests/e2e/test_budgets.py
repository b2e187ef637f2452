"""Budgets over real processes: fault injection slows two services (real model, real Redis)."""
from __future__ import annotations

import time
import urllib.request
import uuid

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from cli.launcher import LocalMesh
from cli.traces import find_trace
from meshkit.tracing.span_file import read_spans
from tests.conftest import running_redis_server
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

POLICY = """
default_total_ms = 30000
[hops]
cache = 20
template = 150
tokenizer = 500
"inference.ttft" = 250
inference = 30000
"""
TEMPLATE_DELAY_MS = 400  # over the template's 150 ms budget: every template call is cut
INFERENCE_DELAY_MS = 400  # over the first token's 250 ms budget: reported, not cut


@pytest.fixture(scope="module")
def slow_mesh(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slow-mesh")
    policy = run_dir / "budgets.toml"
    policy.write_text(POLICY)
    with running_redis_server() as redis:
        mesh = LocalMesh(run_dir, free_ports=True, redis_url=redis.url, progress=lambda line: None, extra_env={
            "NLPMESH_GATEWAY_BUDGETS_FILE": str(policy),
            "NLPMESH_TEMPLATE_FAULT_DELAY_MS": str(TEMPLATE_DELAY_MS),
            "NLPMESH_INFERENCE_FAULT_DELAY_MS": str(INFERENCE_DELAY_MS),
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        })
        mesh.start(ready_timeout_s=300)
        try:
            yield mesh
        finally:
            mesh.stop()


@pytest.fixture(scope="module")
def stub(slow_mesh):
    with grpc.insecure_channel(slow_mesh.gateway_address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def spans_of(mesh: LocalMesh, trace_id: str, wanted: int, timeout_s: float = 10.0):
    """The trace's spans once the span files hold ``wanted`` of them (each process flushes in batches)."""
    def found():
        spans = find_trace(read_spans(mesh.trace_dir), trace_id)
        return spans if len(spans) >= wanted else None

    return wait_until(found, timeout_s=timeout_s, every_s=0.2, what=lambda: (
        f"{wanted} spans of trace {trace_id} in the span files, found "
        f"{[s.name for s in find_trace(read_spans(mesh.trace_dir), trace_id)]}"))


def inference_generate_calls(mesh: LocalMesh) -> float:
    text = urllib.request.urlopen(mesh.metrics_url("inference"), timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nlpmesh_rpc_handled_total{") and 'method="Generate"' in line)


def test_a_hop_slowed_by_fault_injection_is_over_budget_in_the_response_and_its_span(slow_mesh, stub):
    request = gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content="Say hi.")]),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=4), cache_mode=gateway_pb2.CACHE_MODE_BYPASS)
    reply = stub.Generate(request, timeout=60)
    timings = {t.hop: t for t in reply.timings}
    assert reply.text.strip()
    if reply.finish_reason == gateway_pb2.FINISH_REASON_LENGTH:
        assert reply.usage.completion_tokens == 4
    ttft = timings["inference.ttft"]
    assert ttft.over_budget and ttft.budget_ms == 250 and ttft.elapsed_ms >= INFERENCE_DELAY_MS
    assert not timings["tokenizer"].over_budget

    spans = spans_of(slow_mesh, reply.trace_id, wanted=8)
    [ttft_span] = [s for s in spans if s.hop == "inference.ttft"]
    assert ttft_span.over_budget and ttft_span.budget_ms == 250
    assert not any(s.over_budget for s in spans if s.hop == "tokenizer")


def test_a_budget_too_small_for_a_hop_fails_naming_it_and_inference_never_sees_it(slow_mesh, stub):
    variables = struct_pb2.Struct()
    variables.update({"question": "What is a bond?"})
    request = gateway_pb2.GenerateRequest(
        template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=4), cache_mode=gateway_pb2.CACHE_MODE_BYPASS)
    trace_id = uuid.uuid4().hex  # a trace of this test's own
    calls_before = inference_generate_calls(slow_mesh)
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=60, metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),))
    elapsed = time.perf_counter() - started
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = error_details_pb2.ErrorInfo()
    assert rpc_status.from_call(caught.value).details[0].Unpack(info)
    assert info.metadata["hop"] == "template"
    assert elapsed < TEMPLATE_DELAY_MS / 1000  # cut at the hop's budget, not when the slow hop ended

    spans = spans_of(slow_mesh, trace_id, wanted=2)
    assert any(s.hop == "template" for s in spans)
    time.sleep(0.5)  # not a wait for state: inference spans, had there been any, would have been flushed by now
    spans = find_trace(read_spans(slow_mesh.trace_dir), trace_id)
    assert not any(s.short_service == "inference" for s in spans)
    assert inference_generate_calls(slow_mesh) == calls_before
