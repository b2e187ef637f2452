"""The inference service's metrics over a real in-process server, on a tiny random Llama."""
import asyncio

from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from prometheus_client import REGISTRY

from services.inference.servicer import build_spec
from services.inference.settings import InferenceSettings
from tests.polling import until
from tests.tiny_llama import real_tokenizer, tiny_engine


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def request(max_new_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(prompt_token_ids=real_tokenizer().encode("Hello there"),
                                         sampling=inference_pb2.Sampling(max_new_tokens=max_new_tokens))


def test_a_streamed_generation_records_ttft_rate_tokens_and_the_engine_gauges(inprocess_server):
    engine = tiny_engine(max_running=1)
    settings = InferenceSettings(port=0)
    spec = build_spec(settings, engine_factory=lambda _: engine)
    ttft = sample("nlpmesh_inference_time_to_first_token_seconds_count")
    rate = sample("nlpmesh_inference_tokens_per_second_count")
    tokens = sample("nlpmesh_inference_completion_tokens_total")
    served = sample("nlpmesh_rpc_handled_total", service="inference", method="Generate", code="OK")
    cancelled = sample("nlpmesh_inference_requests_finished_total", finish_reason="cancelled")

    async def main():
        async with inprocess_server(spec, settings) as running:
            stub = inference_pb2_grpc.InferenceServiceStub(running.channel)
            long = stub.Generate(request(2000))  # holds the only slot
            await long.read()
            queued = stub.Generate(request(4))
            # Read at scrape time from the engine: one running, one waiting for the slot once it arrives.
            await until(lambda: sample("nlpmesh_inference_queue_depth") == 1, what="the second request to queue")
            assert sample("nlpmesh_inference_active_sequences") == 2
            long.cancel()
            assert [chunk async for chunk in queued][-1].done
        assert sample("nlpmesh_inference_active_sequences") == 0  # closed: no longer read

    try:
        asyncio.run(main())
    finally:
        engine.close()
    assert sample("nlpmesh_inference_time_to_first_token_seconds_count") == ttft + 2
    assert sample("nlpmesh_inference_tokens_per_second_count") == rate + 1  # the one that finished
    assert sample("nlpmesh_inference_completion_tokens_total") == tokens + 4
    assert sample("nlpmesh_inference_requests_finished_total", finish_reason="cancelled") == cancelled + 1
    assert sample("nlpmesh_rpc_handled_total", service="inference", method="Generate", code="OK") == served + 1
