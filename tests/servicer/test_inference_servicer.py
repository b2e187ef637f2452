"""The inference service over a real in-process grpc.aio server, on a tiny random Llama."""
import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from meshkit.sampling import Sampling
from meshkit.wire import InferenceLoad
from services.inference.engine import Engine
from services.inference.generation_types import Delta, GenerationRequest
from services.inference.servicer import build_spec
from services.inference.settings import InferenceSettings
from tests.polling import until
from tests.tiny_llama import real_tokenizer, tiny_engine

PROMPT = real_tokenizer().encode("Hello there")


def run_with_stub(inprocess_server, body, warm=True, **options):
    engine = tiny_engine(**options)
    # The service reports its capacity from its settings: the same as the engine's.
    settings = InferenceSettings(port=0, **{k: v for k, v in options.items() if k in ("max_running", "max_queue")})
    spec = build_spec(settings, engine_factory=lambda _: engine)

    async def main():
        async with inprocess_server(spec, settings, warm=warm) as running:
            await body(inference_pb2_grpc.InferenceServiceStub(running.channel), engine)

    try:
        asyncio.run(main())
    finally:
        engine.close()


def generate_request(max_new_tokens=8, **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt_token_ids=PROMPT,
        sampling=inference_pb2.Sampling(max_new_tokens=max_new_tokens, **sampling),
    )


async def engine_text(engine: Engine, max_new_tokens: int) -> str:
    stream = engine.submit(GenerationRequest(PROMPT, Sampling(max_new_tokens=max_new_tokens)))
    return "".join([item.text async for item in stream if isinstance(item, Delta)])


async def wait_idle(engine: Engine, within_s: float = 1.0) -> None:
    # Well under the time the 2000-token requests below would take to finish by themselves.
    await until(lambda: engine.active_count == 0, timeout_s=within_s,
                what=lambda: f"the engine to be idle ({engine.active_count} still active)")


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


def test_generate_streams_deltas_then_a_final_chunk(inprocess_server):
    async def body(stub, engine):
        chunks = [chunk async for chunk in stub.Generate(generate_request(max_new_tokens=12))]
        *deltas, last = chunks
        assert deltas and not any(chunk.done for chunk in deltas)
        assert "".join(chunk.delta for chunk in deltas) == await engine_text(engine, 12)
        assert last.done and last.delta == ""
        assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert (last.prompt_tokens, last.completion_tokens) == (len(PROMPT), 12)

    run_with_stub(inprocess_server, body)


def test_a_stop_sequence_ends_the_stream_with_stop_sequence(inprocess_server):
    async def body(stub, engine):
        full = await engine_text(engine, 16)
        stop = full[4:8]
        chunks = [chunk async for chunk in stub.Generate(generate_request(16, stop=[stop]))]
        assert "".join(chunk.delta for chunk in chunks) == full[: full.index(stop)]
        assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_STOP_SEQUENCE

    run_with_stub(inprocess_server, body)


@pytest.mark.parametrize(
    "sampling, field",
    [({"temperature": -1.0}, "sampling.temperature"), ({"top_p": 2.0}, "sampling.top_p"),
     ({"max_new_tokens": 5000}, "sampling.max_new_tokens")],
)
def test_bad_sampling_is_invalid_argument_naming_the_field(inprocess_server, sampling, field):
    async def body(stub, engine):
        request = generate_request(**{"max_new_tokens": 8, **sampling})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [chunk async for chunk in stub.Generate(request)]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(caught.value) == [field]

    run_with_stub(inprocess_server, body)


def test_an_empty_prompt_is_invalid_argument_on_prompt(inprocess_server):
    async def body(stub, engine):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [chunk async for chunk in stub.Generate(inference_pb2.GenerateRequest())]
        assert bad_request_fields(caught.value) == ["prompt"]

    run_with_stub(inprocess_server, body)


def test_an_unknown_model_is_not_found(inprocess_server):
    async def body(stub, engine):
        request = generate_request()
        request.model = "gpt-17"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [chunk async for chunk in stub.Generate(request)]
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        request.model = "tiny-llama"
        assert (await _last(stub.Generate(request))).done

    run_with_stub(inprocess_server, body)


async def _last(call):
    return [chunk async for chunk in call][-1]


def test_model_info_describes_the_loaded_model(inprocess_server):
    async def body(stub, engine):
        info = await stub.ModelInfo(inference_pb2.ModelInfoRequest())
        assert (info.model, info.revision) == ("tiny-llama", "test")
        assert (info.context_length, info.default_max_new_tokens) == (4096, 256)

    run_with_stub(inprocess_server, body)


def test_before_warm_up_calls_are_unavailable(inprocess_server):
    async def body(stub, engine):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfo(inference_pb2.ModelInfoRequest())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    run_with_stub(inprocess_server, body, warm=False)


def test_a_client_cancel_frees_the_engine(inprocess_server):
    async def body(stub, engine):
        call = stub.Generate(generate_request(max_new_tokens=2000))
        first = await call.read()
        assert first.delta and engine.active_count == 1
        call.cancel()
        await wait_idle(engine)

    run_with_stub(inprocess_server, body)


def test_a_passed_deadline_frees_the_engine(inprocess_server):
    async def body(stub, engine):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [chunk async for chunk in stub.Generate(generate_request(max_new_tokens=2000), timeout=0.3)]
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_idle(engine)

    run_with_stub(inprocess_server, body)


def test_a_full_queue_is_resource_exhausted_with_retry_info(inprocess_server):
    async def body(stub, engine):
        running = stub.Generate(generate_request(max_new_tokens=2000))
        await running.read()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [chunk async for chunk in stub.Generate(generate_request())]
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = rpc_status.from_call(caught.value).details
        assert any(detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for detail in details)
        running.cancel()
        await wait_idle(engine)

    run_with_stub(inprocess_server, body, max_running=1, max_queue=0)


def test_every_generate_and_model_info_reports_the_load(inprocess_server):
    async def body(stub, engine):
        info = stub.ModelInfo(inference_pb2.ModelInfoRequest())
        await info
        assert InferenceLoad.from_metadata(await info.initial_metadata()) == InferenceLoad(0, 2)
        running = stub.Generate(generate_request(max_new_tokens=2000))
        await running.read()
        assert InferenceLoad.from_metadata(await running.initial_metadata()) == InferenceLoad(1, 2)
        second = stub.Generate(generate_request(max_new_tokens=2000))  # queued behind the first: no chunk yet
        assert InferenceLoad.from_metadata(await second.initial_metadata()) == InferenceLoad(2, 2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [chunk async for chunk in stub.Generate(generate_request())]
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert InferenceLoad.from_metadata(caught.value.trailing_metadata()) == InferenceLoad(2, 2)
        assert rpc_status.from_call(caught.value) is not None  # the rich status travels beside it
        second.cancel()
        running.cancel()
        await wait_idle(engine)
        short = stub.Generate(generate_request(max_new_tokens=2))
        _ = [chunk async for chunk in short]
        assert InferenceLoad.from_metadata(await short.trailing_metadata()) == InferenceLoad(0, 2)

    run_with_stub(inprocess_server, body, max_running=1, max_queue=1)
