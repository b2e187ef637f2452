"""services/inference/metrics.py: time to first token, tokens per second, token counts, engine gauges."""
import time
from types import SimpleNamespace

from prometheus_client import REGISTRY

from services.inference.generation_types import Delta, Finished, FinishReason
from services.inference.metrics import GenerationTimer, unwatch_engine, watch_engine


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_generation_records_ttft_tokens_per_second_and_token_counts():
    ttft_count, ttft_sum = (sample("nlpmesh_inference_time_to_first_token_seconds_count"),
                            sample("nlpmesh_inference_time_to_first_token_seconds_sum"))
    rate_count = sample("nlpmesh_inference_tokens_per_second_count")
    rate_sum = sample("nlpmesh_inference_tokens_per_second_sum")
    tokens = sample("nlpmesh_inference_completion_tokens_total")
    length = sample("nlpmesh_inference_requests_finished_total", finish_reason="length")

    # Bounded by the clock read around each step (the timer's own), not by the sleeps alone: a
    # loaded machine can oversleep.
    submitted = time.perf_counter()
    timer = GenerationTimer()
    time.sleep(0.05)  # queue wait and prefill
    timer.seen(Delta("Hel"))
    first = time.perf_counter()
    time.sleep(0.1)  # 10 more tokens in 0.1 s: about 100 tokens/s
    timer.seen(Delta("lo"))
    timer.seen(Finished(FinishReason.LENGTH, prompt_tokens=5, completion_tokens=11))
    finished = time.perf_counter()

    assert sample("nlpmesh_inference_time_to_first_token_seconds_count") == ttft_count + 1  # once, not per delta
    assert 0.05 <= sample("nlpmesh_inference_time_to_first_token_seconds_sum") - ttft_sum <= first - submitted
    assert sample("nlpmesh_inference_tokens_per_second_count") == rate_count + 1
    assert 10 / (finished - submitted) <= sample("nlpmesh_inference_tokens_per_second_sum") - rate_sum <= 100
    assert sample("nlpmesh_inference_completion_tokens_total") == tokens + 11
    assert sample("nlpmesh_inference_requests_finished_total", finish_reason="length") == length + 1


def test_a_request_cancelled_before_any_token_records_no_ttft():
    ttft_count = sample("nlpmesh_inference_time_to_first_token_seconds_count")
    cancelled = sample("nlpmesh_inference_requests_finished_total", finish_reason="cancelled")
    GenerationTimer().seen(Finished(FinishReason.CANCELLED, prompt_tokens=5, completion_tokens=0))
    assert sample("nlpmesh_inference_time_to_first_token_seconds_count") == ttft_count
    assert sample("nlpmesh_inference_requests_finished_total", finish_reason="cancelled") == cancelled + 1


def test_the_gauges_read_the_watched_engine_at_scrape_time():
    engine = SimpleNamespace(queue_depth=3, active_count=5)
    watch_engine(engine)
    try:
        assert sample("nlpmesh_inference_queue_depth") == 3
        assert sample("nlpmesh_inference_active_sequences") == 5
        engine.queue_depth, engine.active_count = 0, 1
        assert sample("nlpmesh_inference_queue_depth") == 0
        assert sample("nlpmesh_inference_active_sequences") == 1
        unwatch_engine(SimpleNamespace())  # another engine closing changes nothing
        assert sample("nlpmesh_inference_active_sequences") == 1
    finally:
        unwatch_engine(engine)
    assert sample("nlpmesh_inference_active_sequences") == 0
