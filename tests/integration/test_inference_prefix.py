"""Prefix KV reuse: keys, the in-process LRU, and sharing through a real Redis.

The engines run the tiny model; Redis is a private redis-server (tests/conftest.py).
"""
import random
import socket
import threading
import time
import uuid

import pytest
import redis
import torch

from services.inference import metrics
from services.inference.prefix import PrefixCache, RedisBlocks
from tests.tiny_models import FAMILIES, greedy_text, real_tokenizer, tiny_engine, tiny_model

BLOCK = 4
PROMPT = ("You are a careful assistant for a bank. Answer briefly, cite the policy, and never reveal "
          "account numbers. Question: what is the fee for a late payment?")


def cache(shared: RedisBlocks | None = None, revision: str = "r1", local_bytes: int = 64 * 2**20,
          min_sightings: int = 2) -> PrefixCache:
    return PrefixCache(model="tiny", revision=revision, block_tokens=BLOCK, local_bytes=local_bytes, shared=shared,
                       redis_min_sightings=min_sightings)


def prompt_ids() -> list[int]:
    return real_tokenizer().encode(PROMPT)


def counter(metric, *labels) -> float:
    return metric.labels(*labels)._value.get() if labels else metric._value.get()


def reusable(ids: list[int]) -> int:
    """Prompt tokens the prefix cache can cover: whole blocks, never the last token."""
    return (len(ids) - 1) // BLOCK * BLOCK


def one_off_prompts(count: int, tokens: int = 30, seed: int = 0) -> list[list[int]]:
    """Prompts that share no block, not even the first."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(tokens)] for _ in range(count)]


def in_redis(url: str, namespace: str) -> tuple[int, int]:
    """(blocks, first-sighting markers) in Redis under the namespace."""
    with redis.Redis.from_url(url) as client:
        names = [name.decode() for name in client.scan_iter(match=f"{namespace}:*", count=1000)]
    markers = sum(name.startswith(f"{namespace}:seen:") for name in names)
    return len(names) - markers, markers


@pytest.fixture
def namespace() -> str:
    return f"test:kv:{uuid.uuid4().hex}"


@pytest.fixture
def redis_blocks(redis_server, namespace):
    """Makes Redis tiers that share one namespace of their own, as replicas of one deployment do.

    Their budget is generous: these tests count what was written, and the shared
    test machine is sometimes slower than a production budget.
    """
    return lambda: RedisBlocks(redis_server, key_prefix=namespace, budget_s=1.0)


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
    expected = greedy_text(plain, ids)
    assert greedy_text(reusing, ids) == expected  # fills the cache
    prefilled = counter(metrics.PREFILL_TOKENS)
    reused = counter(metrics.PREFIX_TOKENS_REUSED, "local")
    assert greedy_text(reusing, ids) == expected
    assert counter(metrics.PREFIX_TOKENS_REUSED, "local") - reused == reusable(ids)
    assert counter(metrics.PREFILL_TOKENS) - prefilled == len(ids) - reusable(ids)


@pytest.mark.parametrize("precision", [None, "int8", "int4", "float32"])  # None: the model's own forward and layers
@pytest.mark.parametrize("family", FAMILIES)
def test_for_each_family_a_prefix_hit_gives_the_greedy_answer_of_a_cold_prefill(family, precision):
    """The prompt runs well past the tiny Gemma's sliding window: a reused prefix holds every position's
    KV, and the tail's sliding layers still see only their window."""
    from services.inference.precision import apply_precision

    def model():
        return tiny_model(family) if precision is None else apply_precision(tiny_model(family), precision)

    ids = prompt_ids() + prompt_ids()
    plain, reusing = tiny_engine(model()), tiny_engine(model(), prefix_cache=cache())
    try:
        expected = greedy_text(plain, ids)
        assert greedy_text(reusing, ids) == expected  # fills the cache
        reused = counter(metrics.PREFIX_TOKENS_REUSED, "local")
        assert greedy_text(reusing, ids) == expected
        assert counter(metrics.PREFIX_TOKENS_REUSED, "local") - reused == reusable(ids)
        assert greedy_text(reusing, ids[:-5]) == greedy_text(plain, ids[:-5])  # a shorter one sharing the blocks
    finally:
        plain.close()
        reusing.close()


def test_the_local_tier_stays_within_its_byte_bound(engines):
    prefix = cache(local_bytes=10_000)
    greedy_text(engines(prefix), prompt_ids())
    assert 0 < prefix.local_bytes <= 10_000


def test_a_second_replica_reuses_a_prefix_the_first_computed_through_redis(engines, redis_blocks):
    ids = prompt_ids()
    first_tier = redis_blocks()
    plain, first, second = engines(), engines(cache(first_tier)), engines(cache(redis_blocks()))
    expected = greedy_text(plain, ids)
    assert greedy_text(first, ids) == expected
    assert greedy_text(first, ids) == expected  # its second sighting: now its blocks go to Redis
    first_tier.flush()  # its writes go out on a background thread
    reused = counter(metrics.PREFIX_TOKENS_REUSED, "redis")
    prefilled = counter(metrics.PREFILL_TOKENS)
    assert greedy_text(second, ids) == expected
    assert counter(metrics.PREFIX_TOKENS_REUSED, "redis") - reused == reusable(ids)
    assert counter(metrics.PREFILL_TOKENS) - prefilled == len(ids) - reusable(ids)


def test_two_tenants_with_the_same_prompt_never_share_a_prefix_entry(engines, redis_blocks):
    ids = prompt_ids()
    shared = redis_blocks()
    engine = engines(cache(shared))
    greedy_text(engine, ids, tenant="acme")
    shared.flush()
    local_hits, redis_hits = counter(metrics.PREFIX_LOOKUPS, "local", "hit"), counter(
        metrics.PREFIX_LOOKUPS, "redis", "hit")
    reused = counter(metrics.PREFIX_TOKENS_REUSED, "local") + counter(metrics.PREFIX_TOKENS_REUSED, "redis")
    greedy_text(engine, ids, tenant="globex")
    assert counter(metrics.PREFIX_LOOKUPS, "local", "hit") == local_hits
    assert counter(metrics.PREFIX_LOOKUPS, "redis", "hit") == redis_hits
    assert counter(metrics.PREFIX_TOKENS_REUSED, "local") + counter(
        metrics.PREFIX_TOKENS_REUSED, "redis") == reused
    greedy_text(engine, ids, tenant="acme")  # while the first tenant's own entry is still there
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
        assert greedy_text(engine, prompt_ids())  # the request is answered, as a miss
        assert counter(metrics.PREFIX_LOOKUPS, "redis", "error") > errors


def test_blocks_made_while_redis_was_down_reach_it_once_it_is_back(engines, redis_server, namespace, redis_blocks):
    ids = prompt_ids()
    now = [0.0]
    shared = RedisBlocks(redis_server, key_prefix=namespace, budget_s=1.0, cooldown_s=60, clock=lambda: now[0])
    engine = engines(cache(shared))
    shared._failed("read", redis.ConnectionError())  # as after a failure: cooling down
    greedy_text(engine, ids)
    now[0] += 61  # the cooldown is over: Redis is tried again
    greedy_text(engine, ids)  # a local hit: its blocks go to Redis now
    shared.flush()
    reused = counter(metrics.PREFIX_TOKENS_REUSED, "redis")
    greedy_text(engines(cache(redis_blocks())), ids)
    assert counter(metrics.PREFIX_TOKENS_REUSED, "redis") - reused == reusable(ids)


def test_one_off_prompts_write_only_markers_and_a_prompt_sent_twice_writes_its_blocks(
        engines, redis_blocks, redis_server, namespace):
    shared = redis_blocks()
    engine = engines(cache(shared))
    prompts = one_off_prompts(20)
    for ids in prompts:
        greedy_text(engine, ids)
    shared.flush()
    blocks_per_prompt = reusable(prompts[0]) // BLOCK
    assert in_redis(redis_server, namespace) == (0, 20 * blocks_per_prompt)
    greedy_text(engine, prompts[0])  # its second sighting
    shared.flush()
    assert in_redis(redis_server, namespace) == (blocks_per_prompt, 20 * blocks_per_prompt)


def test_a_shared_head_reaches_redis_while_the_one_off_tails_do_not(engines, redis_blocks, redis_server, namespace):
    head = prompt_ids()[: 6 * BLOCK]  # a system prompt of 6 whole blocks
    shared = redis_blocks()
    engine = engines(cache(shared))
    for tail in one_off_prompts(10, tokens=2 * BLOCK + 1):
        greedy_text(engine, head + tail)
    shared.flush()
    assert in_redis(redis_server, namespace)[0] == 6


def test_a_prompt_sent_once_to_each_of_two_replicas_is_written_by_the_second(engines, redis_blocks):
    ids = prompt_ids()
    first_tier, second_tier = redis_blocks(), redis_blocks()
    plain, first, second, third = (engines(), engines(cache(first_tier)), engines(cache(second_tier)),
                                   engines(cache(redis_blocks())))
    expected = greedy_text(plain, ids)
    assert greedy_text(first, ids) == expected  # leaves first-sighting markers
    first_tier.flush()
    assert greedy_text(second, ids) == expected  # finds them: writes the blocks
    second_tier.flush()
    reused = counter(metrics.PREFIX_TOKENS_REUSED, "redis")
    assert greedy_text(third, ids) == expected
    assert counter(metrics.PREFIX_TOKENS_REUSED, "redis") - reused == reusable(ids)


def test_min_sightings_1_writes_every_block_at_once_as_before(engines, redis_blocks, redis_server, namespace):
    ids = prompt_ids()
    shared = redis_blocks()
    greedy_text(engines(cache(shared, min_sightings=1)), ids)
    shared.flush()
    assert in_redis(redis_server, namespace) == (reusable(ids) // BLOCK, 0)


def test_an_evicted_marker_costs_one_more_sighting(engines, redis_blocks, redis_server, namespace):
    ids = prompt_ids()
    first_tier, second_tier = redis_blocks(), redis_blocks()
    greedy_text(engines(cache(first_tier)), ids)
    first_tier.flush()
    with redis.Redis.from_url(redis_server) as client:
        client.delete(*client.scan_iter(match=f"{namespace}:seen:*"))  # as eviction would
    second = engines(cache(second_tier))
    greedy_text(second, ids)  # a first sighting again, as far as Redis knows
    second_tier.flush()
    assert in_redis(redis_server, namespace)[0] == 0
    greedy_text(second, ids)
    second_tier.flush()
    assert in_redis(redis_server, namespace)[0] == reusable(ids) // BLOCK


def test_block_keys_name_what_computed_the_kv_so_other_kernels_never_share_blocks():
    tokens = list(range(3 * BLOCK))

    def keys_of(computed_by: str) -> list[bytes]:
        cache = PrefixCache(model="tiny", revision="r1", block_tokens=BLOCK, local_bytes=1 << 20, shared=None)
        cache.configure(2, 2, 16, torch.float32, computed_by=computed_by)
        return cache.keys("acme", tokens)

    assert keys_of("cpu/int8") == keys_of("cpu/int8")
    assert keys_of("cpu/int8") != keys_of("cuda/torch.bfloat16")
    assert keys_of("cpu/int8") != keys_of("cpu/float32")


def test_by_default_a_prompt_sharing_270_of_300_tokens_prefills_one_tiles_worth(engines):
    """The default block size reuses all but at most block - 1 shared tokens: a 300-token prompt
    sharing 270 with a cached one prefills 32 (one GEMM tile), where 16-token blocks left 44 (two)."""
    from services.inference.settings import InferenceSettings
    from services.inference.tiles import GEMM_TILE_ROWS

    block = InferenceSettings().prefix_block_tokens
    rng = random.Random(3)
    shared = [rng.randrange(1000, 40000) for _ in range(270)]
    first, second = ([rng.randrange(1000, 40000) for _ in range(30)] for _ in range(2))
    reusing = engines(PrefixCache(model="tiny", revision="r1", block_tokens=block))
    greedy_text(reusing, shared + first, max_new_tokens=1)
    prefilled = counter(metrics.PREFILL_TOKENS)
    greedy_text(reusing, shared + second, max_new_tokens=1)
    assert counter(metrics.PREFILL_TOKENS) - prefilled == 300 - 270 // block * block <= GEMM_TILE_ROWS
