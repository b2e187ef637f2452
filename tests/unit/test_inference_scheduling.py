"""The engine's prefill scheduling on the tiny model: a burst packed into few forwards, waiting prefills in
earliest-deadline-first order, and a request whose first token cannot come by its deadline refused before
any compute is spent on it."""
import asyncio
import time

import pytest

from meshkit.errors import DeadlineExceeded, Unavailable
from meshkit.sampling import Sampling
from services.inference import metrics
from services.inference.generation_types import Delta, FinishReason, GenerationRequest
from services.inference.tiles import GEMM_TILE_ROWS as T
from tests.tiny_models import tiny_engine
from tests.unit.test_inference_chunking import float32_tiny, run_greedy


def prompt(seed: int, length: int) -> list[int]:
    return [3 + (seed * 31 + i * 7) % 200 for i in range(length)]


def record_forwards(engine) -> list[tuple[tuple[int, ...], int]]:
    """(the prompt lengths in it, layers) for each piece of prefill work: one packed forward's layers."""
    forwards = []
    advance = engine._advance

    def recording(batch, layers):
        forwards.append((tuple(chunk.total for chunk in batch.forward.chunks), layers))
        return advance(batch, layers)

    engine._advance = recording
    return forwards


def beside_a_decoding_stream(engine, prompts: list[list[int]], max_new_tokens: int = 6) -> list[list[str]]:
    """Starts a stream, and once it decodes submits ``prompts`` at once; their greedy texts."""
    async def run():
        first = engine.submit(GenerationRequest(list(range(5, 15)), Sampling(max_new_tokens=60)))
        await first.__anext__()
        streams = [engine.submit(GenerationRequest(ids, Sampling(max_new_tokens=max_new_tokens))) for ids in prompts]
        texts = [[item.text for item in [item async for item in stream] if isinstance(item, Delta)]
                 for stream in streams]
        first.cancel()
        return texts
    return asyncio.run(run())


def test_a_burst_admitted_while_a_stream_decodes_is_prefilled_in_fewer_turns_than_one_prompt_at_a_time():
    burst = [prompt(seed, 40 + seed) for seed in range(4)]  # distinct lengths name them in the record
    alone = tiny_engine(float32_tiny(), max_running=8, max_batched_tokens=0)
    try:
        expected = [run_greedy(alone, ids, 6) for ids in burst]
    finally:
        alone.close()
    engine = tiny_engine(float32_tiny(), max_running=8, max_batched_tokens=16 * T, prefill_share=1e-9)
    forwards = record_forwards(engine)
    try:
        one_turns = []
        for ids in burst:  # one prompt at a time beside the stream: the turns each takes
            forwards.clear()
            assert beside_a_decoding_stream(engine, [ids]) == [expected[burst.index(ids)]]
            one_turns.append(sum(1 for lengths, _ in forwards if len(ids) in lengths))
        forwards.clear()
        assert beside_a_decoding_stream(engine, burst) == expected  # together: the same greedy answers
    finally:
        engine.close()
    burst_turns = sum(1 for lengths, _ in forwards if set(lengths) & {len(ids) for ids in burst})
    assert max(len(lengths) for lengths, _ in forwards) > 1  # prompts packed into one forward
    assert burst_turns < sum(one_turns)


def test_waiting_prefills_go_earliest_deadline_first():
    engine = tiny_engine(float32_tiny(), max_running=1)
    forwards = record_forwards(engine)
    late, soon = prompt(1, 20), prompt(2, 30)
    try:
        async def run():
            first = engine.submit(GenerationRequest(list(range(5, 15)), Sampling(max_new_tokens=30)))
            await first.__anext__()  # it holds the only row: the next two wait for it
            now = time.monotonic()
            streams = [engine.submit(GenerationRequest(late, Sampling(max_new_tokens=2), deadline=now + 120)),
                       engine.submit(GenerationRequest(soon, Sampling(max_new_tokens=2), deadline=now + 60))]
            for stream in [first, *streams]:
                assert [item async for item in stream][-1].finish_reason == FinishReason.LENGTH
        asyncio.run(run())
    finally:
        engine.close()
    order = [lengths[0] for lengths, _ in forwards if lengths[0] in (len(late), len(soon))]
    assert order == [len(soon), len(late)]  # submitted second, prefilled first


@pytest.mark.parametrize("running", [False, True])
def test_a_request_whose_first_token_cannot_come_by_its_deadline_is_refused_before_its_prefill(running):
    engine = tiny_engine(float32_tiny(), max_running=4)
    engine._seconds_per_tile = lambda: 0.2  # the measured prefill cost, fixed for the test
    forwards = record_forwards(engine)
    hopeless, feasible, generous = prompt(1, 20), prompt(2, 21), prompt(3, 22)  # one tile each: 0.2 s
    refused_before = metrics.DEADLINE_REFUSALS._value.get()
    try:
        async def run():
            first = None
            if running:
                first = engine.submit(GenerationRequest(list(range(5, 15)), Sampling(max_new_tokens=20)))
                await first.__anext__()
            now = time.monotonic()
            streams = [engine.submit(GenerationRequest(ids, Sampling(max_new_tokens=2), deadline=now + left))
                       for ids, left in ((hopeless, 0.1), (feasible, 5.0), (generous, 60.0))]
            results = []
            for stream in streams:
                try:
                    results.append([item async for item in stream][-1].finish_reason)
                except DeadlineExceeded as error:
                    results.append(error)
            if first is not None:
                [item async for item in first]
            return results
        error, *served = asyncio.run(run())
    finally:
        engine.close()
    assert served == [FinishReason.LENGTH, FinishReason.LENGTH]
    assert isinstance(error, DeadlineExceeded) and error.hop == "inference"
    assert "waited in the queue" in error.message and "ms left" in error.message
    assert all(len(hopeless) not in lengths for lengths, _ in forwards)  # no compute spent on it
    assert any(len(feasible) in lengths for lengths, _ in forwards)
    assert metrics.DEADLINE_REFUSALS._value.get() == refused_before + 1


def test_the_estimate_learns_from_first_tokens_that_came_sooner_than_it_said():
    engine = tiny_engine(float32_tiny(), max_running=4)
    engine._seconds_per_tile = lambda: 0.2  # far more than the tiny model's tile costs: estimates run long
    try:
        async def run(left_s: float, count: int) -> list:
            now = time.monotonic()
            results = []
            for index in range(count):
                stream = engine.submit(GenerationRequest(prompt(index, 20), Sampling(max_new_tokens=1),
                                                         deadline=now + left_s))
                try:
                    results.append([item async for item in stream][-1].finish_reason)
                except DeadlineExceeded as error:
                    results.append(error)
            return results

        first = asyncio.run(run(0.15, 1))  # estimated 0.2 s for a 0.15 s deadline: refused
        served = asyncio.run(run(30.0, 8))  # each came far sooner than its 0.2 s estimate
        after = asyncio.run(run(0.15, 1))
    finally:
        engine.close()
    assert isinstance(first[0], DeadlineExceeded)
    assert served == [FinishReason.LENGTH] * 8
    assert after == [FinishReason.LENGTH]  # the corrected estimate fits the same deadline


@pytest.mark.parametrize("measured_s_ago", [60.0, 0.0])
def test_an_estimate_measured_long_ago_lets_one_request_run_to_measure_it_again(measured_s_ago):
    """A prefill cost inflated (as by a spell of heavy load) refuses every request with a deadline while it is
    fresh; once old, with nothing prefilling, the next request runs and its prefill corrects the estimate."""
    engine = tiny_engine(float32_tiny(), max_running=4)
    probes_before = metrics.ESTIMATE_PROBES._value.get()
    try:
        with engine._lock:
            engine._layer_s = 10.0  # far beyond the tiny model's: every estimate runs minutes
            engine._layer_measured_at = time.monotonic() - measured_s_ago

        async def run() -> list:
            results = []
            for index in range(2):
                stream = engine.submit(GenerationRequest(prompt(index, 20), Sampling(max_new_tokens=1),
                                                         deadline=time.monotonic() + 5.0))
                try:
                    results.append([item async for item in stream][-1].finish_reason)
                except DeadlineExceeded as error:
                    results.append(error)
            return results

        results = asyncio.run(run())
        layer_s = engine._layer_s
    finally:
        engine.close()
    if measured_s_ago:
        # The first ran as a probe; its prefill measured the real cost, which replaced the old average (a blend
        # would keep 8 s of it), so the second fits its deadline too.
        assert results == [FinishReason.LENGTH, FinishReason.LENGTH]
        assert layer_s < 2.0 and metrics.ESTIMATE_PROBES._value.get() == probes_before + 1
    else:
        assert all(isinstance(result, DeadlineExceeded) for result in results)
        assert layer_s == 10.0 and metrics.ESTIMATE_PROBES._value.get() == probes_before


def test_the_warm_up_leaves_no_measured_cost_behind():
    """The warm-up's forwards pay for lazy set-up: what they measured would make the first estimates run long."""
    from services.inference.loading import warm_up_engine

    engine = tiny_engine(float32_tiny(), max_running=4)
    try:
        asyncio.run(warm_up_engine(engine))
        costs = (engine._layer_s, engine._step_s, engine._seconds_per_tile())
        served = run_greedy(engine, prompt(1, 20), max_new_tokens=2)
        measured = engine._layer_s
    finally:
        engine.close()
    assert costs == (None, None, None)
    assert served and measured is not None  # the first real prefill measures it


class _WorkerFault(BaseException):
    """Not an Exception: what the per-batch handlers do not catch (pytest's own failures are such)."""


def test_a_worker_stopped_by_a_fault_ends_its_streams_unavailable_and_refuses_new_ones():
    engine = tiny_engine(float32_tiny(), max_running=4)
    try:
        def fault():
            raise _WorkerFault()
        engine._prefill_turn = fault

        async def first():
            return [item async for item in engine.submit(GenerationRequest(prompt(1, 8), Sampling(max_new_tokens=4)))]
        with pytest.raises(Unavailable):
            asyncio.run(asyncio.wait_for(first(), 30))  # ended, not left waiting on a worker that is gone

        async def second():
            engine.submit(GenerationRequest(prompt(2, 8), Sampling(max_new_tokens=4)))
        with pytest.raises(Unavailable):
            asyncio.run(second())
    finally:
        engine.close()
