"""Chunked prefill: where chunks end, and the engine's turns on the tiny model.

A chunk ends on a GEMM tile boundary (the prefill's fixed tiles,
services/inference/tiles.py), so chunking never changes a row's bits; the
real model's check of that is in tests/integration/test_inference_real_model.py.
"""
import asyncio

import pytest

from meshkit.sampling import Sampling
from services.inference.engine import chunk_end
from services.inference.generation_types import Delta, FinishReason, GenerationRequest
from services.inference.precision import apply_precision
from services.inference.tiles import BY_POSITION, FROM_START, GEMM_TILE_ROWS
from tests.tiny_models import FAMILIES, tiny_engine, tiny_model

T = GEMM_TILE_ROWS


@pytest.mark.parametrize(("start", "total", "budget", "first", "end"), [
    (0, 1000, None, True, 1000),  # no budget: the whole prompt
    (0, 40, 63, True, 40),  # fits
    (0, 1000, 63, True, T),  # whole tiles within the budget
    (0, 1000, 3 * T + 5, True, 3 * T),
    (T, 1000, 2 * T, True, 3 * T),
    (16, 1000, 63, True, 2 * T),  # after a reused prefix: up to a boundary within the budget
    (16, 1000, 20, True, T),  # ... or the next one
    (0, 1000, 7, True, T),  # the turn's first chunk: at least one tile
    (0, 1000, 7, False, 0),  # later in a turn: nothing
    (0, 20, 7, True, 20),  # ... and a first chunk never runs past the prompt
    (10 * T, 10 * T + 3, 0, True, 10 * T + 3),
])
def test_a_chunk_ends_at_the_prompts_end_or_on_a_tile_boundary_within_the_budget(start, total, budget, first, end):
    assert chunk_end(start, total, budget, first, BY_POSITION) == end


@pytest.mark.parametrize(("start", "total", "budget", "first", "end"), [
    (0, 1000, 63, True, T),
    (16, 1000, 63, True, 16 + T),  # tiles begin where the prefill does: one whole tile
    (16, 1000, 2 * T + 1, True, 16 + 2 * T),
    (16, 1000, 20, True, 16 + T),  # the turn's first chunk: at least one tile
    (16, 1000, 20, False, 16),
    (16, 40, 20, True, 40),
])
def test_placed_from_the_start_a_chunk_after_a_reused_prefix_takes_whole_tiles_from_there(start, total, budget, first,
                                                                                           end):
    assert chunk_end(start, total, budget, first, FROM_START) == end


def run_greedy(engine, prompt: list[int], max_new_tokens: int) -> list[str]:
    async def run():
        stream = engine.submit(GenerationRequest(prompt, Sampling(max_new_tokens=max_new_tokens)))
        return [item.text for item in [item async for item in stream] if isinstance(item, Delta)]
    return asyncio.run(run())


def float32_tiny(family: str = "llama"):
    return apply_precision(tiny_model(family), "float32")  # the real model's tiled prefill kernels


@pytest.mark.parametrize("family", FAMILIES)
def test_a_long_prompt_admitted_beside_a_running_stream_is_chunked_and_both_answers_hold(family):
    # The tiny model: 4 * T + 5 prompt tokens come in 5 chunks while the short stream decodes.
    alone_engine = tiny_engine(float32_tiny(family), max_running=4, max_batched_tokens=0)
    try:
        short, long = list(range(5, 15)), [3 + (i * 7) % 200 for i in range(4 * T + 5)]
        expected_short, expected_long = run_greedy(alone_engine, short, 40), run_greedy(alone_engine, long, 8)
    finally:
        alone_engine.close()
    engine = tiny_engine(float32_tiny(family), max_running=4, max_batched_tokens=T + 2, prefill_share=0)
    chunks = record_chunks(engine)
    try:
        async def together():
            first = engine.submit(GenerationRequest(short, Sampling(max_new_tokens=40)))
            items = [await first.__anext__()]  # it decodes before the long prompt arrives
            second = engine.submit(GenerationRequest(long, Sampling(max_new_tokens=8)))
            items += [item async for item in first]
            return ([item.text for item in items if isinstance(item, Delta)],
                    [item.text for item in [item async for item in second] if isinstance(item, Delta)])
        got_short, got_long = asyncio.run(together())
    finally:
        engine.close()
    assert got_short == expected_short
    assert got_long == expected_long
    assert [(start, end, layers) for total, start, end, layers in chunks if total == len(long)] == [
        (0, T, 2), (T, 2 * T, 2), (2 * T, 3 * T, 2), (3 * T, 4 * T, 2), (4 * T, 4 * T + 5, 2)]  # all layers at once


@pytest.mark.parametrize("family", FAMILIES)
def test_under_a_short_time_budget_a_chunk_runs_its_layers_over_several_turns(family):
    alone_engine = tiny_engine(float32_tiny(family), max_running=4, max_batched_tokens=0)
    try:
        short, long = list(range(5, 15)), [3 + (i * 7) % 200 for i in range(2 * T + 5)]
        expected_short, expected_long = run_greedy(alone_engine, short, 40), run_greedy(alone_engine, long, 8)
    finally:
        alone_engine.close()
    # a decode step's billionth: one layer a turn (the least), a decode step between two
    engine = tiny_engine(float32_tiny(family), max_running=4, max_batched_tokens=T + 2, prefill_share=1e-9)
    chunks = record_chunks(engine)
    try:
        async def together():
            first = engine.submit(GenerationRequest(short, Sampling(max_new_tokens=40)))
            items = [await first.__anext__()]
            second = engine.submit(GenerationRequest(long, Sampling(max_new_tokens=8)))
            items += [item async for item in first]
            return ([item.text for item in items if isinstance(item, Delta)],
                    [item.text for item in [item async for item in second] if isinstance(item, Delta)])
        got_short, got_long = asyncio.run(together())
    finally:
        engine.close()
    assert got_short == expected_short
    assert got_long == expected_long
    # the tiny model has 2 layers: each chunk's first layer in one turn, its second in the next
    assert [(start, end, layers) for total, start, end, layers in chunks if total == len(long)] == [
        (0, T, 1), (0, T, 1), (T, 2 * T, 1), (T, 2 * T, 1), (2 * T, 2 * T + 5, 1), (2 * T, 2 * T + 5, 1)]


def record_chunks(engine, before=None) -> list[tuple[int, int, int, int]]:
    """(prompt length, chunk start, chunk end, layers) for each piece of prefill work the engine runs."""
    chunks = []
    advance = engine._advance

    def recording(batch, layers):
        for chunk in batch.forward.chunks:
            chunks.append((chunk.total, chunk.start, chunk.end, layers))
            if before is not None:
                before(chunk)
        return advance(batch, layers)

    engine._advance = recording
    return chunks


def test_cancelling_a_prompt_between_its_chunks_frees_its_row_and_the_running_stream_goes_on():
    alone_engine = tiny_engine(float32_tiny(), max_running=2, max_batched_tokens=0)
    try:
        short, long = list(range(5, 15)), [3 + (i * 7) % 200 for i in range(6 * T)]
        expected_short = run_greedy(alone_engine, short, 30)
    finally:
        alone_engine.close()
    engine = tiny_engine(float32_tiny(), max_running=2, max_batched_tokens=T + 2)
    streams = {}

    def cancelling(chunk):
        if chunk.total == len(long) and chunk.start == T:
            streams["long"].cancel()  # between its first and second chunk

    chunks = record_chunks(engine, cancelling)
    try:
        async def run():
            first = engine.submit(GenerationRequest(short, Sampling(max_new_tokens=30)))
            items = [await first.__anext__()]
            streams["long"] = engine.submit(GenerationRequest(long, Sampling(max_new_tokens=4)))
            items += [item async for item in first]
            last = [item async for item in streams["long"]][-1]
            return [item.text for item in items if isinstance(item, Delta)], last

        got_short, last = asyncio.run(run())
        assert got_short == expected_short
        assert last.finish_reason == FinishReason.CANCELLED and last.completion_tokens == 0
        assert [start for total, start, _, _ in chunks if total == len(long)][-1] <= 2 * T  # stopped early
        assert engine.running_count == 0
        assert run_greedy(engine, short, 30) == expected_short  # both rows free again
    finally:
        engine.close()


def test_with_chunking_off_a_prompt_beside_a_running_stream_goes_in_one_forward_through_all_layers():
    engine = tiny_engine(float32_tiny(), max_running=4, max_batched_tokens=0, prefill_share=1e-9)
    chunks = record_chunks(engine)
    try:
        short, long = list(range(5, 15)), [3 + (i * 7) % 200 for i in range(3 * T + 5)]

        async def together():
            first = engine.submit(GenerationRequest(short, Sampling(max_new_tokens=20)))
            await first.__anext__()
            second = engine.submit(GenerationRequest(long, Sampling(max_new_tokens=2)))
            return [item async for item in first][-1], [item async for item in second][-1]

        asyncio.run(together())
    finally:
        engine.close()
    assert [(start, end, layers) for total, start, end, layers in chunks if total == len(long)] == [
        (0, len(long), 2)]
