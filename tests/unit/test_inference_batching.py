"""Continuous batching on the tiny model: requests join and leave a running batch."""
import asyncio

import pytest

from meshkit.sampling import Sampling
from services.inference import metrics
from services.inference.generation_types import Delta, FinishReason, GenerationRequest
from tests.tiny_models import real_tokenizer, tiny_engine


@pytest.fixture
def engine():
    engine = tiny_engine(max_running=4, max_queue=4)
    yield engine
    engine.close()


def request(prompt: str, max_new_tokens: int, **sampling) -> GenerationRequest:
    return GenerationRequest(real_tokenizer().encode(prompt), Sampling(max_new_tokens=max_new_tokens, **sampling))


async def texts(stream) -> tuple[list[str], object]:
    items = [item async for item in stream]
    return [item.text for item in items[:-1]], items[-1]


def test_a_request_joining_mid_batch_finishes_correctly_and_leaves_before_the_long_one(engine):
    async def alone(prompt: str, max_new_tokens: int):
        return await texts(engine.submit(request(prompt, max_new_tokens)))

    long_alone = asyncio.run(alone("The capital of France is", 60))
    short_alone = asyncio.run(alone("1, 2, 3,", 8))
    batch_sizes_before = metrics.BATCH_SIZE.collect()[0].samples

    async def together():
        long = engine.submit(request("The capital of France is", 60))
        seen = []
        async for item in long:  # the long one is decoding on its own...
            seen.append(item)
            if len(seen) == 10:
                break
        short_items = [item async for item in engine.submit(request("1, 2, 3,", 8))]  # ...when the short one joins
        running_after_short = engine.running_count
        rest = [item async for item in long]
        return seen + rest, short_items, running_after_short

    long_items, short_items, running_after_short = asyncio.run(together())
    assert [item.text for item in short_items[:-1]] == short_alone[0]
    assert short_items[-1] == short_alone[1]
    assert [item.text for item in long_items[:-1]] == long_alone[0]
    assert long_items[-1] == long_alone[1] and long_items[-1].finish_reason == FinishReason.LENGTH
    assert running_after_short == 1  # the short one left while the long one went on
    assert _batches_of_two(metrics.BATCH_SIZE.collect()[0].samples) > _batches_of_two(batch_sizes_before)


def test_each_request_keeps_its_own_sampling_in_one_batch(engine):
    seeded = dict(temperature=0.9, top_p=0.9, seed=7)

    async def alone():
        return [await texts(engine.submit(request(p, 16, **seeded))) for p in ("Hello there", "日本語のテキスト")] + [
            await texts(engine.submit(request("Hello there", 5)))
        ]

    async def together():
        return await asyncio.gather(
            texts(engine.submit(request("Hello there", 16, **seeded))),
            texts(engine.submit(request("日本語のテキスト", 16, **seeded))),
            texts(engine.submit(request("Hello there", 5))),
        )

    expected = asyncio.run(alone())
    assert asyncio.run(together()) == expected
    assert expected[2][1].completion_tokens == 5


def test_cancelling_one_request_frees_its_row_while_the_others_go_on(engine):
    async def main():
        keep = engine.submit(request("Hello there", 30))
        drop = engine.submit(request("The capital of France is", 2000))
        first = await anext(drop)
        assert isinstance(first, Delta)
        drop.cancel()
        kept = [item async for item in keep]
        dropped = [item async for item in drop]
        return kept, dropped

    kept, dropped = asyncio.run(main())
    assert dropped[-1].finish_reason == FinishReason.CANCELLED
    assert kept[-1].completion_tokens == 30
    assert engine.active_count == 0 and engine.running_count == 0


def _batches_of_two(samples) -> float:
    """Decode steps that ran with 2 or more sequences, from the histogram's samples."""
    buckets = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    return buckets.get("+Inf", 0) - buckets.get("1.0", 0)
