"""Prefix KV reuse: keys, the in-process LRU, and sharing through a real Redis.

The engines run the tiny model; Redis is a private redis-server (tests/conftest.py).
"""
import asyncio
import socket
import threading
import time
import uuid

import pytest

from meshkit.sampling import Sampling
from services.inference import metrics
from services.inference.generation_types import GenerationRequest
from services.inference.prefix import PrefixCache, RedisBlocks
from tests.tiny_llama import real_tokenizer, tiny_engine

BLOCK = 4
PROMPT = ("You are a careful assistant for a bank. Answer briefly, cite the policy, and never reveal "
          "account numbers. Question: what is the fee for a late payment?")


def cache(shared: RedisBlocks | None = None, revision: str = "r1", local_bytes: int = 64 * 2**20) -> PrefixCache:
    return PrefixCache(model="tiny", revision=revision, block_tokens=BLOCK, local_bytes=local_bytes, shared=shared)


def prompt_ids() -> list[int]:
    return real_tokenizer().encode(PROMPT)


def generate(engine, ids: list[int], tenant: str = "acme") -> str:
    async def run():
        stream = engine.submit(GenerationRequest(ids, Sampling(max_new_tokens=12), tenant=tenant))
        items = [item async for item in stream]
        return "".join(item.text for item in items[:-1])

    return asyncio.run(run())


def counter(metric, *labels) -> float:
    return metric.labels(*labels)._value.get() if labels else metric._value.get()


def reusable(ids: list[int]) -> int:
    """Prompt tokens the prefix cache can cover: whole blocks, never the last token."""
    return (len(ids) - 1) // BLOCK * BLOCK


@pytest.fixture
def engines():
    """Makes tiny engines (with the given prefix cache) and closes them after the test."""
    made = []

    def make(prefix_cache: PrefixCache | None = None):
        made.append(tiny_engine(prefix_cache=prefix_cache))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def redis_blocks(redis_server):
    """Makes Redis tiers that share one namespace of their own, as replicas of one deployment do."""
    namespace = f"test:kv:{uuid.uuid4().hex}"
    return lambda: RedisBlocks(redis_server, key_prefix=namespace)


def test_keys_cover_full_blocks_and_never_the_last_token():
    ids = list(range(100, 117))  # 17 tokens: 4 full blocks, the 17th is left to prefill
    assert len(cache().keys("acme", ids)) == 4
    assert len(cache().keys("acme", ids[:16])) == 3  # 16 tokens: the last block would leave nothing


def test_keys_are_chained_and_carry_tenant_and_revision():
    ids = list(range(100, 121))
    keys = cache().keys("acme", ids)
    assert cache().keys("acme", ids) == keys
    changed_first = cache().keys("acme", [1] + ids[1:])
    assert all(a != b for a, b in zip(keys, changed_first))  # a block's key covers every token before it
    assert set(cache().keys("globex", ids)).isdisjoint(keys)
    assert set(cache(revision="r2").keys("acme", ids)).isdisjoint(keys)
    assert all(b"acme" not in key for key in keys)


def test_a_repeated_prompt_skips_the_cached_prefix_with_the_same_greedy_output(engines):
    ids = prompt_ids()
    plain, reusing = engines(), engines(cache())
    expected = generate(plain, ids)
    assert generate(reusing, ids) == expected  # fills the cache
    prefilled = counter(metrics.PREFILL_TOKENS)
    reused = counter(metrics.PREFIX_TOKENS_REUSED, "local")
    assert generate(reusing, ids) == expected
    assert counter(metrics.PREFIX_TOKENS_REUSED, "local") - reused == reusable(ids)
    assert counter(metrics.PREFILL_TOKENS) - prefilled == len(ids) - reusable(ids)


def test_the_local_tier_stays_within_its_byte_bound(engines):
    prefix = cache(local_bytes=10_000)
    generate(engines(prefix), prompt_ids())
    assert 0 < prefix.local_bytes <= 10_000


def test_a_second_replica_reuses_a_prefix_the_first_computed_through_redis(engines, redis_blocks):
    ids = prompt_ids()
    first_tier = redis_blocks()
    plain, first, second = engines(), engines(cache(first_tier)), engines(cache(redis_blocks()))
    expected = generate(plain, ids)
    assert generate(first, ids) == expected
    first_tier.flush()  # its writes go out on a background thread
    reused = counter(metrics.PREFIX_TOKENS_REUSED, "redis")
    prefilled = counter(metrics.PREFILL_TOKENS)
    assert generate(second, ids) == expected
    assert counter(metrics.PREFIX_TOKENS_REUSED, "redis") - reused == reusable(ids)
    assert counter(metrics.PREFILL_TOKENS) - prefilled == len(ids) - reusable(ids)


def test_two_tenants_with_the_same_prompt_never_share_a_prefix_entry(engines, redis_blocks):
    ids = prompt_ids()
    shared = redis_blocks()
    engine = engines(cache(shared))
    generate(engine, ids, tenant="acme")
    shared.flush()
    local_hits, redis_hits = counter(metrics.PREFIX_LOOKUPS, "local", "hit"), counter(
        metrics.PREFIX_LOOKUPS, "redis", "hit")
    reused = counter(metrics.PREFIX_TOKENS_REUSED, "local") + counter(metrics.PREFIX_TOKENS_REUSED, "redis")
    generate(engine, ids, tenant="globex")
    assert counter(metrics.PREFIX_LOOKUPS, "local", "hit") == local_hits
    assert counter(metrics.PREFIX_LOOKUPS, "redis", "hit") == redis_hits
    assert counter(metrics.PREFIX_TOKENS_REUSED, "local") + counter(
        metrics.PREFIX_TOKENS_REUSED, "redis") == reused
    generate(engine, ids, tenant="acme")  # while the first tenant's own entry is still there
    assert counter(metrics.PREFIX_LOOKUPS, "local", "hit") == local_hits + 1


def test_a_redis_that_never_answers_costs_one_budget_then_is_skipped(engines):
    with socket.socket() as listener:  # accepts connections, never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        accepted = []
        threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
        blocks = RedisBlocks(f"redis://127.0.0.1:{port}/0", budget_s=0.2, cooldown_s=60)
        engine = engines(cache(blocks))
        errors = counter(metrics.PREFIX_LOOKUPS, "redis", "error")
        started = time.monotonic()
        assert blocks.get([b"k"]) is None
        assert time.monotonic() - started < 2.0  # the 0.2 s budget, not a hang
        started = time.monotonic()
        assert blocks.get([b"k"]) is None  # cooling down: not even tried
        assert time.monotonic() - started < 0.05
        assert generate(engine, prompt_ids())  # the request is answered, as a miss
        assert counter(metrics.PREFIX_LOOKUPS, "redis", "error") > errors


def test_blocks_made_while_redis_was_down_reach_it_once_it_is_back(engines, redis_blocks):
    ids = prompt_ids()
    shared = redis_blocks()
    engine = engines(cache(shared))
    shared._down_until = time.monotonic() + 60  # as after a failure: cooling down
    generate(engine, ids)
    shared._down_until = 0.0  # Redis is back
    generate(engine, ids)  # a local hit: its blocks go to Redis now
    shared.flush()
    reused = counter(metrics.PREFIX_TOKENS_REUSED, "redis")
    generate(engines(cache(redis_blocks())), ids)
    assert counter(metrics.PREFIX_TOKENS_REUSED, "redis") - reused == reusable(ids)
