"""Prefix KV under a Redis that evicts or refuses: a miss, never an error or another answer.

The engines run the tiny model; each test's redis-server is private and tiny
(``--maxmemory 2mb``, tests/conftest.py), so its blocks are evicted for real.
"""
import logging
import random
import uuid

import pytest
import redis

from services.inference import metrics
from services.inference.prefix import PrefixCache, RedisBlocks, block_name
from tests.conftest import fill_until_refused, running_redis_server
from tests.tiny_models import greedy_text

BLOCK = 4
TINY_REDIS = ("--maxmemory", "2mb")


def cache(shared: RedisBlocks, min_sightings: int = 1) -> PrefixCache:
    """min_sightings 1 writes every block: the most churn for Redis."""
    return PrefixCache(model="tiny", revision="r1", block_tokens=BLOCK, shared=shared,
                       redis_min_sightings=min_sightings)


def reused_from_redis() -> float:
    return metrics.PREFIX_TOKENS_REUSED.labels("redis")._value.get()


def prompts(count: int, tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(tokens)] for _ in range(count)]


@pytest.fixture
def tiers():
    """Makes Redis tiers on one namespace (as replicas of one deployment) and flushes their writes."""
    namespace = f"test:kv:{uuid.uuid4().hex}"
    made = []

    def make(url: str, **options) -> RedisBlocks:
        made.append(RedisBlocks(url, key_prefix=namespace, budget_s=1.0, **options))
        return made[-1]

    make.namespace = namespace
    make.flush = lambda: [tier.flush() for tier in made]
    return make


def test_blocks_evicted_by_allkeys_lru_are_misses_and_answers_stay_exact(engines, tiers):
    with running_redis_server(*TINY_REDIS, "--maxmemory-policy", "allkeys-lru") as server:
        many = prompts(30, tokens=130)  # 30 x 32 blocks of 2 KiB: about 2 MB, more than fits
        plain, writer = engines(), engines(cache(tiers(server.url)))
        expected = [greedy_text(plain, ids) for ids in many]
        assert [greedy_text(writer, ids) for ids in many] == expected
        tiers.flush()
        with redis.Redis.from_url(server.url) as client:
            assert client.info("stats")["evicted_keys"] > 0
        reused = reused_from_redis()
        # A replica that saw none of them, writing only markers (its own blocks would evict the rest).
        reader = engines(cache(tiers(server.url), min_sightings=2))
        assert [greedy_text(reader, ids) for ids in many] == expected
        assert 0 < reused_from_redis() - reused < 30 * 32 * BLOCK  # some blocks were there, some evicted


@pytest.mark.parametrize("evicted", [[0], [3], [1, 5], list(range(8))], ids=["first", "middle", "two", "all"])
def test_a_chain_with_evicted_blocks_reuses_the_run_before_the_first_gap(engines, tiers, redis_server, evicted):
    ids = prompts(1, tokens=37)[0]  # 9 blocks
    written = cache(tiers(redis_server))
    plain, writer = engines(), engines(written)
    expected = greedy_text(plain, ids)
    greedy_text(writer, ids)
    tiers.flush()
    keys = written.keys("acme", ids)  # as its engine configured it: the keys it wrote
    with redis.Redis.from_url(redis_server) as client:  # as eviction would, block by block
        client.delete(*(block_name(tiers.namespace, keys[index]) for index in evicted))
    reused = reused_from_redis()
    assert greedy_text(engines(cache(tiers(redis_server))), ids) == expected
    assert reused_from_redis() - reused == min(evicted) * BLOCK


def test_a_write_refused_under_noeviction_is_one_warning_and_reads_go_on(engines, tiers, caplog):
    with running_redis_server(*TINY_REDIS, "--maxmemory-policy", "noeviction") as server:
        before, after = prompts(2, tokens=37), prompts(5, tokens=37, seed=1)
        plain = engines()
        expected = {tuple(ids): greedy_text(plain, ids) for ids in before + after}
        greedy_text(engines(cache(tiers(server.url))), before[0])
        greedy_text(engines(cache(tiers(server.url))), before[1])
        tiers.flush()
        fill_until_refused(server.url)
        tier = tiers(server.url, cooldown_s=60)
        replica = engines(cache(tier))
        reused = reused_from_redis()
        with caplog.at_level(logging.WARNING, logger="nlpmesh.inference.prefix"):
            assert greedy_text(replica, before[0]) == expected[tuple(before[0])]  # read from the full Redis
            for ids in after:
                assert greedy_text(replica, ids) == expected[tuple(ids)]  # writes refused
                tier.flush()
            assert greedy_text(replica, before[1]) == expected[tuple(before[1])]  # reads go on meanwhile
        assert reused_from_redis() - reused == 2 * 9 * BLOCK
        refusals = [record for record in caplog.records if "refused" in record.getMessage()]
        assert len(refusals) == 1 and "OutOfMemoryError" in refusals[0].getMessage()
        assert not tier.writable and not tier.cooling_down
