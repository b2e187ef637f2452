"""The tracing interceptor over real in-process servers: each call runs in a SERVER span that
continues the caller's W3C trace context; a malformed traceparent starts a new trace."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nlpmesh.gateway.v1 import gateway_pb2
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from nlpmesh.template.v1 import template_pb2, template_pb2_grpc
from opentelemetry.trace import SpanKind, StatusCode

from gateway.settings import GatewaySettings
from meshkit import span_names
from meshkit.errors import Unavailable
from meshkit.server import ServiceSpec, rpc_method
from meshkit.tracing.provider import tracer
from services.template.servicer import build_spec as template_spec
from services.template.settings import TemplateSettings
from tests.polling import until
from tests.servicer.gateway_mesh import run_mesh

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"
RENDER = "nlpmesh.template.v1.TemplateService/Render"


def render_request(template_id="finance_question") -> template_pb2.RenderRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": "What is a bond?"})
    return template_pb2.RenderRequest(id=template_id, variables=variables)


def call_template(inprocess_server, call):
    async def main():
        async with inprocess_server(template_spec(TemplateSettings()), TemplateSettings()) as server:
            return await call(server.channel)

    return asyncio.run(main())


def named(spans, name):
    [span] = [s for s in spans if s.name == name]
    return span


def test_a_call_continues_the_callers_trace_in_a_server_span(inprocess_server, finished_spans):
    async def render(channel):
        stub = template_pb2_grpc.TemplateServiceStub(channel)
        return await stub.Render(render_request(), timeout=5, metadata=(("traceparent", TRACEPARENT),))

    assert call_template(inprocess_server, render).messages
    spans = finished_spans.get_finished_spans()
    server = named(spans, RENDER)
    assert server.kind == SpanKind.SERVER
    assert server.context.trace_id == TRACE_ID
    assert server.parent.span_id == CALLER_SPAN_ID and server.parent.is_remote
    assert server.attributes[span_names.RPC_SYSTEM] == "grpc"
    assert server.attributes[span_names.RPC_GRPC_STATUS_CODE] == grpc.StatusCode.OK.value[0]
    render_span = named(spans, span_names.TEMPLATE_RENDER)
    assert render_span.parent.span_id == server.context.span_id
    assert render_span.attributes[span_names.TEMPLATE_ID] == "finance_question"


@pytest.mark.parametrize("traceparent", ["00-zz-bad", f"00-{0:032x}-{CALLER_SPAN_ID:016x}-01", "garbage" * 20])
def test_a_malformed_traceparent_is_ignored_and_the_call_succeeds_in_a_new_trace(
        inprocess_server, finished_spans, traceparent):
    async def render(channel):
        stub = template_pb2_grpc.TemplateServiceStub(channel)
        return await stub.Render(render_request(), timeout=5, metadata=(("traceparent", traceparent),))

    assert call_template(inprocess_server, render).messages
    server = named(finished_spans.get_finished_spans(), RENDER)
    assert server.parent is None
    assert server.context.is_valid and server.context.trace_id not in (0, TRACE_ID)


def test_a_call_that_fails_records_its_status_code(inprocess_server, finished_spans):
    async def render(channel):
        stub = template_pb2_grpc.TemplateServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Render(render_request("no_such_template"), timeout=5)
        return caught.value.code()

    assert call_template(inprocess_server, render) == grpc.StatusCode.NOT_FOUND
    server = named(finished_spans.get_finished_spans(), RENDER)
    assert server.attributes[span_names.RPC_GRPC_STATUS_CODE] == grpc.StatusCode.NOT_FOUND.value[0]
    assert server.status.status_code == StatusCode.UNSET  # the caller's mistake, not the service's failure


def test_health_checks_are_not_traced(inprocess_server, finished_spans):
    async def check(channel):
        return await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    assert call_template(inprocess_server, check).status == health_pb2.HealthCheckResponse.SERVING
    assert finished_spans.get_finished_spans() == ()


class CountingStream(inference_pb2_grpc.InferenceServiceServicer):
    """Streams three chunks, each made inside a span of its own; fails when told to."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    @rpc_method
    async def Generate(self, request, context):
        for i in range(3):
            with tracer("inference").start_as_current_span(f"chunk {i}"):
                await asyncio.sleep(0.01)  # a chunk that takes time, so its span lies inside the call's
            yield inference_pb2.GenerateChunk(delta=str(i))
        if self.fail:
            raise Unavailable("the model went away")
        yield inference_pb2.GenerateChunk(done=True)


def stream_spans(inprocess_server, finished_spans, servicer):
    spec = ServiceSpec(name="inference", service_names=("inference",),
                       register=lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server))

    async def main():
        async with inprocess_server(spec, GatewaySettings()) as server:
            stub = inference_pb2_grpc.InferenceServiceStub(server.channel)
            call = stub.Generate(inference_pb2.GenerateRequest(), timeout=5, metadata=(("traceparent", TRACEPARENT),))
            try:
                return [chunk.delta async for chunk in call]
            except grpc.aio.AioRpcError as error:
                return error.code()

    outcome = asyncio.run(main())
    spans = finished_spans.get_finished_spans()
    return outcome, named(spans, "nlpmesh.inference.v1.InferenceService/Generate"), spans


def test_a_streaming_call_runs_inside_one_server_span_that_covers_every_message(inprocess_server, finished_spans):
    outcome, server, spans = stream_spans(inprocess_server, finished_spans, CountingStream())
    assert outcome == ["0", "1", "2", ""]
    assert server.context.trace_id == TRACE_ID and server.parent.span_id == CALLER_SPAN_ID
    chunks = [named(spans, f"chunk {i}") for i in range(3)]
    assert all(chunk.parent.span_id == server.context.span_id for chunk in chunks)
    assert server.start_time < chunks[0].start_time and chunks[-1].end_time <= server.end_time
    assert server.attributes[span_names.RPC_GRPC_STATUS_CODE] == 0


def test_a_stream_that_fails_on_the_service_side_is_an_error_span(inprocess_server, finished_spans):
    outcome, server, _ = stream_spans(inprocess_server, finished_spans, CountingStream(fail=True))
    assert outcome == grpc.StatusCode.UNAVAILABLE
    assert server.attributes[span_names.RPC_GRPC_STATUS_CODE] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert server.status.status_code == StatusCode.ERROR


async def store_finished(finished_spans) -> None:
    """The store runs after the answer was sent: wait for its server span."""
    await until(lambda: any(s.name == "nlpmesh.cache.v1.CacheService/Store" for s in finished_spans.get_finished_spans()),
                what="the cache Store span")


def test_downstream_server_spans_hang_under_the_gateways_hop_spans(inprocess_server, redis_server, finished_spans):
    """The gateway's request span is its server span; each hop is its child, and the called
    service's server span is the hop's child, all in the caller's trace."""
    async def scenario(stub, tokenizer, inference):
        finished_spans.clear()  # warm-up calls are traces of their own
        variables = struct_pb2.Struct()
        variables.update({"question": "What is a bond?"})
        request = gateway_pb2.GenerateRequest(
            template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
            sampling=gateway_pb2.SamplingParams(max_new_tokens=3), cache_mode=gateway_pb2.CACHE_MODE_REFRESH)
        reply = await stub.Generate(request, timeout=10, metadata=(("traceparent", TRACEPARENT),))
        await store_finished(finished_spans)
        return reply

    reply = run_mesh(inprocess_server, redis_server, scenario)
    assert reply.trace_id == f"{TRACE_ID:032x}"
    spans = finished_spans.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {TRACE_ID}
    request_span = named(spans, "nlpmesh.gateway.v1.Gateway/Generate")
    assert request_span.parent.span_id == CALLER_SPAN_ID
    assert format(request_span.context.trace_id, "032x") == reply.trace_id
    for hop, served in [("template", RENDER), ("tokenizer", "nlpmesh.tokenizer.v1.TokenizerService/EncodeChat"),
                        ("inference", "nlpmesh.inference.v1.InferenceService/Generate")]:
        hop_span = named(spans, f"hop {hop}")
        assert hop_span.parent.span_id == request_span.context.span_id
        assert hop_span.attributes[span_names.HOP] == hop and span_names.OVER_BUDGET in hop_span.attributes
        assert named(spans, served).parent.span_id == hop_span.context.span_id, served
    store = named(spans, "nlpmesh.cache.v1.CacheService/Store")
    assert store.parent.span_id == request_span.context.span_id
    assert named(spans, span_names.REDIS_STORE).parent.span_id == store.context.span_id


def test_a_near_tier_hit_is_its_request_span_alone_and_a_redis_tier_hit_keeps_its_cache_hop(
        inprocess_server, redis_server, finished_spans):
    """The cache hop's span exists only when the lookup leaves the gateway (Redis); a hit from
    the gateway's own memory (the near tier) is told by its request span."""
    async def scenario(stub, tokenizer, inference):
        request = gateway_pb2.GenerateRequest(
            chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content="What is a bond?")]),
            sampling=gateway_pb2.SamplingParams(max_new_tokens=3), cache_mode=gateway_pb2.CACHE_MODE_USE)
        await stub.Generate(request, timeout=10)
        await store_finished(finished_spans)
        from_redis = await stub.Generate(request, timeout=10)
        from_memory = await stub.Generate(request, timeout=10)
        return from_redis, from_memory

    from_redis, from_memory = run_mesh(inprocess_server, redis_server, scenario)
    assert from_redis.cache_hit and from_memory.cache_hit
    spans = finished_spans.get_finished_spans()

    def trace_of(reply):
        return [s for s in spans if format(s.context.trace_id, "032x") == reply.trace_id]

    [request_span] = trace_of(from_memory)
    assert request_span.name == "nlpmesh.gateway.v1.Gateway/Generate"
    assert request_span.attributes[span_names.CACHE_TIER] == "near"
    assert request_span.attributes[span_names.RPC_GRPC_STATUS_CODE] == 0
    assert {t.hop for t in from_memory.timings} == {"cache", "total"}  # the hop is still timed and budgeted

    redis_trace = trace_of(from_redis)
    request_span = named(redis_trace, "nlpmesh.gateway.v1.Gateway/Generate")
    cache_hop = named(redis_trace, "hop cache")
    assert cache_hop.parent.span_id == request_span.context.span_id
    assert cache_hop.attributes[span_names.BUDGET_MS] == next(t.budget_ms for t in from_redis.timings
                                                             if t.hop == "cache")
    assert named(redis_trace, span_names.REDIS_LOOKUP).parent.span_id == cache_hop.context.span_id
    assert span_names.CACHE_TIER not in request_span.attributes


def test_a_call_in_a_trace_the_caller_sampled_out_exports_no_span_and_nor_do_its_children(
        inprocess_server, finished_spans):
    async def render(channel):
        stub = template_pb2_grpc.TemplateServiceStub(channel)
        traceparent = f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-00"
        return await stub.Render(render_request(), timeout=5, metadata=(("traceparent", traceparent),))

    assert call_template(inprocess_server, render).messages
    assert finished_spans.get_finished_spans() == ()
