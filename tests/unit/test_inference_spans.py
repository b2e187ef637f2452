"""The engine's spans on the tiny model: queue wait, prefill and one decode span per request,
children of the caller's span although the engine runs on its own thread."""
from __future__ import annotations

import asyncio

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace

from meshkit import span_names as names
from meshkit.sampling import Sampling
from services.inference.generation_types import FinishReason, GenerationRequest
from tests.tiny_models import real_tokenizer, tiny_engine

ENGINE_SPANS = (names.INFERENCE_QUEUE_WAIT, names.INFERENCE_PREFILL, names.INFERENCE_DECODE)


@pytest.fixture(scope="module")
def engine():
    engine = tiny_engine(max_running=2, max_queue=4)
    yield engine
    engine.close()


def generate(engine, traced: bool, max_new_tokens: int, **sampling):
    """Runs one request inside a span (when traced); returns (parent span, Finished)."""
    prompt = real_tokenizer().encode("The capital of France is")

    async def main():
        with trace.get_tracer("test").start_as_current_span("caller") as parent:
            context = otel_context.get_current() if traced else None
            request = GenerationRequest(prompt, Sampling(max_new_tokens=max_new_tokens, **sampling),
                                        trace_context=context)
            items = [item async for item in engine.submit(request)]
        return parent, items[-1]

    return asyncio.run(main())


def engine_spans(finished_spans):
    return [s for s in finished_spans.get_finished_spans() if s.name in ENGINE_SPANS]


def test_queue_wait_prefill_and_one_decode_span_are_children_of_the_callers_span(engine, finished_spans):
    parent, finished = generate(engine, True, max_new_tokens=12, temperature=0.7, top_p=0.9, seed=1)
    spans = engine_spans(finished_spans)
    assert [s.name for s in sorted(spans, key=lambda s: s.start_time)] == list(ENGINE_SPANS)
    assert all(s.parent.span_id == parent.get_span_context().span_id for s in spans)
    queue, prefill, decode = sorted(spans, key=lambda s: s.start_time)
    assert queue.end_time <= prefill.start_time and prefill.end_time <= decode.start_time
    for span in spans:
        assert span.attributes[names.GEN_AI_REQUEST_MODEL] == "tiny-llama"
        assert span.attributes[names.GEN_AI_SYSTEM] == names.GEN_AI_SYSTEM_VALUE
        assert span.attributes[names.GEN_AI_REQUEST_MAX_TOKENS] == 12
        assert span.attributes[names.GEN_AI_REQUEST_TEMPERATURE] == pytest.approx(0.7)
        assert span.attributes[names.GEN_AI_REQUEST_TOP_P] == pytest.approx(0.9)
        assert span.attributes[names.GEN_AI_USAGE_INPUT_TOKENS] == finished.prompt_tokens
    assert decode.attributes[names.GEN_AI_USAGE_OUTPUT_TOKENS] == finished.completion_tokens
    assert decode.attributes[names.FINISH_REASON] == FinishReason(finished.finish_reason).name.lower()


def test_a_one_token_answer_has_no_decode_span_and_its_prefill_carries_the_usage(engine, finished_spans):
    _, finished = generate(engine, True, max_new_tokens=1)
    spans = {s.name: s for s in engine_spans(finished_spans)}
    assert set(spans) == {names.INFERENCE_QUEUE_WAIT, names.INFERENCE_PREFILL}
    assert spans[names.INFERENCE_PREFILL].attributes[names.GEN_AI_USAGE_OUTPUT_TOKENS] == 1 == finished.completion_tokens


def test_a_request_without_a_trace_context_makes_no_spans(engine, finished_spans):
    generate(engine, False, max_new_tokens=4)
    assert engine_spans(finished_spans) == []
