"""Tracing over real processes: every service exports its spans by OTLP/gRPC to a real
collector endpoint started here (the standard TraceService), and a request forms one trace."""
from __future__ import annotations

import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import struct_pb2
from nlpmesh.gateway.v1 import gateway_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from cli.launcher import LocalMesh
from cli.traces import show_trace
from meshkit import span_names as names
from meshkit.server import SERVER_OPTIONS
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

SERVICES = {f"nlpmesh-{s}" for s in ("gateway", "template", "tokenizer", "cache", "inference")}
MAX_NEW_TOKENS = 8


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: int
    attributes: dict


def _value(any_value):
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which else None


def _attributes(key_values) -> dict:
    return {kv.key: _value(kv.value) for kv in key_values}


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every span it is sent."""

    def __init__(self):
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            service = _attributes(resource_spans.resource.attributes).get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                received += [
                    ReceivedSpan(service, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex() or None, s.name,
                                 s.kind, _attributes(s.attributes))
                    for s in scope_spans.spans
                ]
        with self._lock:
            self._spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, done, timeout_s: float = 20.0) -> list[ReceivedSpan]:
        """The trace's spans once ``done(spans)`` holds (spans arrive in batches); fails naming what came."""
        def arrived():
            spans = self.trace(trace_id)
            return spans if done(spans) else None

        return wait_until(arrived, timeout_s=timeout_s, every_s=0.1, what=lambda: (
            f"trace {trace_id} to be complete, got {sorted((s.service, s.name) for s in self.trace(trace_id))}"))


@pytest.fixture(scope="module")
def collector():
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.endpoint = f"http://127.0.0.1:{port}"
    yield servicer
    server.stop(None)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, mesh_redis, collector):
    """The mesh, exporting by the standard OTEL_* variables (and, as the launcher does, to files)."""
    local = LocalMesh(
        tmp_path_factory.mktemp("traced-mesh"), free_ports=True, redis_url=mesh_redis.url,
        progress=lambda line: print(f"[mesh] {line}"),
        extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                   "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    local.start(ready_timeout_s=300)
    yield local
    local.stop()


def finance_request(cache_mode, question: str = "What is a bond?") -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": question})
    return gateway_pb2.GenerateRequest(
        template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS), cache_mode=cache_mode,
    )


def has_root(spans: list[ReceivedSpan]) -> bool:
    """The gateway's request span has come, and every other span's parent too.

    Each process exports in batches of its own, so a parent (which ends after
    its children) can arrive after them: until then the trace is not all there.
    """
    ids = {s.span_id for s in spans}
    root = any(s.name == "nlpmesh.gateway.v1.Gateway/Generate" for s in spans)
    return root and all(s.parent_id is None or s.parent_id in ids for s in spans)


def stored_answer(gateway, collector: Collector) -> tuple[gateway_pb2.GenerateRequest, gateway_pb2.GenerateResponse]:
    """A question no other test asked, answered (REFRESH) and stored: its Redis store span has come."""
    question = f"What is a bond? (ref {uuid.uuid4().hex[:8]})"
    reply = gateway.Generate(finance_request(gateway_pb2.CACHE_MODE_REFRESH, question), timeout=120)
    collector.wait_for(reply.trace_id, lambda spans: any(s.name == names.REDIS_STORE for s in spans))
    return finance_request(gateway_pb2.CACHE_MODE_USE, question), reply


def descends_from(span: ReceivedSpan, ancestor: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> bool:
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        if span is ancestor:
            return True
    return False


@pytest.fixture(scope="module")
def generated(gateway, collector):
    """One generated answer (REFRESH: no cache read, the answer stored after) and its trace's spans."""
    reply = gateway.Generate(finance_request(gateway_pb2.CACHE_MODE_REFRESH), timeout=120)
    spans = collector.wait_for(reply.trace_id, lambda spans: has_root(spans) and {s.service for s in spans} >= SERVICES
                               and any(s.name == names.REDIS_STORE for s in spans))
    return reply, spans


def test_one_request_makes_one_trace_with_spans_from_all_five_services(generated):
    reply, spans = generated
    assert reply.text and not reply.cache_hit
    assert [t.hop for t in reply.timings] == ["template", "tokenizer", "inference.ttft", "inference", "total"]
    assert {s.service for s in spans} == SERVICES
    names_seen = {s.name for s in spans}
    for inner in (names.TEMPLATE_RENDER, names.TOKENIZER_ENCODE, names.INFERENCE_QUEUE_WAIT,
                  names.INFERENCE_PREFILL, names.INFERENCE_DECODE, names.REDIS_STORE):
        assert inner in names_seen, inner
    assert {"hop template", "hop tokenizer", "hop inference"} <= names_seen


def test_every_span_hangs_from_the_gateways_request_span(generated):
    _, spans = generated
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans)
    [root] = [s for s in spans if s.parent_id is None]
    assert root.service == "nlpmesh-gateway" and root.name == "nlpmesh.gateway.v1.Gateway/Generate"
    orphans = [s.name for s in spans if s is not root and s.parent_id not in by_id]
    assert orphans == []
    assert all(descends_from(s, root, by_id) for s in spans if s is not root)
    # Each downstream service's server span hangs under the gateway's span for that hop.
    for service, hop in [("template", "template"), ("tokenizer", "tokenizer"), ("inference", "inference")]:
        [server] = [s for s in spans if s.service == f"nlpmesh-{service}" and s.kind == 2]  # SPAN_KIND_SERVER
        assert by_id[server.parent_id].attributes.get(names.HOP) == hop


def test_the_inference_spans_carry_gen_ai_attributes(generated):
    reply, spans = generated
    inference = {s.name: s for s in spans if s.service == "nlpmesh-inference"}
    prefill, decode = inference[names.INFERENCE_PREFILL], inference[names.INFERENCE_DECODE]
    for span in (prefill, decode, inference[names.INFERENCE_QUEUE_WAIT]):
        assert span.attributes[names.GEN_AI_REQUEST_MODEL] == reply.model
        assert span.attributes[names.GEN_AI_SYSTEM] == names.GEN_AI_SYSTEM_VALUE
        assert span.attributes[names.GEN_AI_REQUEST_MAX_TOKENS] == MAX_NEW_TOKENS
        assert span.attributes[names.GEN_AI_REQUEST_TEMPERATURE] == 0.0
        assert names.GEN_AI_REQUEST_TOP_P in span.attributes
        assert span.attributes[names.GEN_AI_USAGE_INPUT_TOKENS] == reply.usage.prompt_tokens
    assert decode.attributes[names.GEN_AI_USAGE_OUTPUT_TOKENS] == reply.usage.completion_tokens


def test_hop_spans_carry_their_budget(generated):
    reply, spans = generated
    hops = {s.attributes[names.HOP]: s for s in spans if names.HOP in s.attributes}
    timings = {t.hop: t for t in reply.timings}
    for hop in ("template", "tokenizer", "inference"):
        attributes = hops[hop].attributes
        assert attributes[names.BUDGET_MS] == pytest.approx(timings[hop].budget_ms)
        assert attributes[names.OVER_BUDGET] is timings[hop].over_budget
        assert attributes[names.ELAPSED_MS] == pytest.approx(timings[hop].elapsed_ms)


def test_a_cache_hit_traces_its_redis_lookup_under_the_cache_hop(gateway, collector):
    request, answer = stored_answer(gateway, collector)
    # The first hit comes from Redis. A lookup over the cache hop's 10 ms budget is a miss by
    # design (a loaded machine can make one): then the answer is generated again, and asked for
    # again, at most three times.
    for _ in range(3):
        hit = gateway.Generate(request, timeout=60)
        if hit.cache_hit:
            break
    assert hit.cache_hit and hit.text == answer.text
    spans = collector.wait_for(hit.trace_id, lambda spans: has_root(spans)
                               and any(s.name == names.REDIS_LOOKUP for s in spans))
    by_id = {s.span_id: s for s in spans}
    [lookup] = [s for s in spans if s.name == names.REDIS_LOOKUP]
    assert lookup.attributes[names.CACHE_HIT] is True
    assert by_id[lookup.parent_id].name == "hop cache"


def test_a_hit_from_the_gateways_memory_is_one_span_that_names_the_tier(gateway, collector):
    """The near tier answers in the gateway's process: no hop leaves it, so no hop span."""
    request, answer = stored_answer(gateway, collector)
    # From Redis, which fills the near tier (a lookup over its 10 ms budget is a miss: ask again).
    assert any(gateway.Generate(request, timeout=60).cache_hit for _ in range(3))
    near = gateway.Generate(request, timeout=30)
    assert near.cache_hit and near.text == answer.text
    assert [t.hop for t in near.timings] == ["cache", "total"]
    collector.wait_for(near.trace_id, has_root)
    time.sleep(0.5)  # not a wait for state: a stray span would have come in the same batches by now
    spans = collector.trace(near.trace_id)
    assert [(s.service, s.name) for s in spans] == [("nlpmesh-gateway", "nlpmesh.gateway.v1.Gateway/Generate")]
    assert spans[0].attributes[names.CACHE_TIER] == "near"


def test_a_malformed_traceparent_is_ignored_and_the_request_gets_a_new_trace(gateway, collector):
    reply = gateway.Generate(finance_request(gateway_pb2.CACHE_MODE_BYPASS), timeout=120,
                             metadata=(("traceparent", "00-zz-bad"),))
    assert reply.text
    assert [t.hop for t in reply.timings] == ["template", "tokenizer", "inference.ttft", "inference", "total"]
    assert len(reply.trace_id) == 32 and int(reply.trace_id, 16) != 0
    served = SERVICES - {"nlpmesh-cache"}  # BYPASS: no store
    spans = collector.wait_for(reply.trace_id, lambda spans: has_root(spans) and {s.service for s in spans} >= served)
    [root] = [s for s in spans if s.parent_id is None]
    assert root.service == "nlpmesh-gateway" and root.name == "nlpmesh.gateway.v1.Gateway/Generate"
    by_id = {s.span_id: s for s in spans}
    assert all(s.parent_id in by_id for s in spans if s is not root)
    assert {s.service for s in spans} == served


def test_the_local_span_files_draw_the_same_request(mesh, generated):
    reply, _ = generated

    def drawn():
        code, text = show_trace(mesh.trace_dir, reply.trace_id)
        return text if code == 0 and all(f" {s.removeprefix('nlpmesh-')} " in text for s in SERVICES) else None

    text = wait_until(drawn, timeout_s=20, every_s=0.2, what=lambda: (
        f"the span files to draw every service: {show_trace(mesh.trace_dir, reply.trace_id)[1]}"))
    assert text.startswith(f"trace {reply.trace_id}")
    assert "hop inference" in text and names.INFERENCE_DECODE in text
