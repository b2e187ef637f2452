"""The one Redis-failure policy (meshkit/redis_failure.py) and its three users, with plain fakes and a frozen clock.

Each fake fails with an error whose text quotes a secret (as a reply error may quote a
key or a value): the secret must never reach a description or a log line.
"""
import asyncio
import logging

import pytest
import redis

from gateway.quotas import Quotas, QuotaSettings
from gateway.tenant import Tenant, TenantLimits
from meshkit.redis_failure import (
    FAILED,
    REFUSED,
    TIMED_OUT,
    UNREACHABLE,
    RedisBackoff,
    describe_failure,
    failure_category,
)
from meshkit.sampling import Sampling
from promptcache.keys import PromptCacheKey, TemplatePrompt
from promptcache.redis_tier import CachedAnswer, PromptCache
from services.inference.prefix import RedisBlocks

SECRET = "tenant-acme:prompt:my-password-is-hunter2"
ERRORS = {
    UNREACHABLE: redis.ConnectionError(f"Error connecting to redis://u:pw@h:6379 while reading {SECRET}"),
    TIMED_OUT: redis.TimeoutError(f"Timeout reading from {SECRET}"),
    REFUSED: redis.ResponseError(f"OOM command not allowed when used memory > 'maxmemory' ({SECRET})"),
    FAILED: redis.DataError(f"Invalid input of type: {SECRET}"),
}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FailingScript:
    """An async Redis script (or command) that raises ``error`` and counts its calls."""

    def __init__(self, error: Exception):
        self.error = error
        self.calls = 0
        self.script = "return 1"

    async def __call__(self, *args, **kwargs):
        self.calls += 1
        raise self.error


class FailingAsyncRedis:
    """What Quotas and PromptCache call on redis.asyncio.Redis; every call fails."""

    def __init__(self, error: Exception):
        self.command = FailingScript(error)

    def register_script(self, script: str) -> FailingScript:
        return self.command

    def pipeline(self, transaction: bool = True):
        self.command.calls += 1
        raise self.command.error

    def __getattr__(self, name: str):
        return self.command

    async def aclose(self) -> None:
        pass


class FailingSyncRedis:
    """What RedisBlocks calls on redis.Redis; every call fails."""

    def __init__(self, error: Exception):
        self.error = error
        self.calls = 0

    def mget(self, names):
        self.calls += 1
        raise self.error

    def pipeline(self, transaction: bool = True):
        self.calls += 1
        raise self.error

    def close(self) -> None:
        pass


@pytest.mark.parametrize("category", sorted(ERRORS))
def test_a_description_names_the_category_and_class_never_the_errors_text(category):
    error = ERRORS[category]
    assert failure_category(error) == category
    assert describe_failure(error) == f"{category} ({type(error).__name__})"
    assert SECRET not in describe_failure(error) and "pw" not in describe_failure(error)


def test_an_asyncio_timeout_and_a_socket_error_are_timed_out_and_unreachable():
    assert failure_category(TimeoutError()) == TIMED_OUT
    assert failure_category(ConnectionRefusedError(111, SECRET)) == UNREACHABLE
    assert failure_category(redis.exceptions.RedisClusterException(SECRET)) == UNREACHABLE


def test_after_a_failure_redis_is_left_alone_for_the_cooldown_then_tried_again():
    clock = Clock()
    backoff = RedisBackoff(5.0, clock)
    assert backoff.may_read() and backoff.may_write()
    assert backoff.failed(ERRORS[UNREACHABLE])  # the first failure starts a cooldown: worth a warning
    assert not backoff.may_read() and not backoff.may_write()
    clock.now += 4.9
    assert not backoff.failed(ERRORS[TIMED_OUT])  # within a cooldown: no second warning, and it restarts
    clock.now += 4.9
    assert not backoff.may_read()
    clock.now += 0.2
    assert backoff.may_read() and backoff.may_write()
    assert backoff.answered()  # the first answer after failures: worth one line
    assert not backoff.answered()
    assert backoff.failures == 2


def test_a_refused_write_pauses_writes_only():
    clock = Clock()
    backoff = RedisBackoff(5.0, clock)
    assert backoff.failed(ERRORS[REFUSED])
    assert backoff.may_read() and not backoff.may_write()
    clock.now += 5.0
    assert backoff.may_write()


def test_a_negative_cooldown_is_refused():
    with pytest.raises(ValueError):
        RedisBackoff(-1.0)


def test_quotas_fall_back_for_the_cooldown_without_calling_redis_and_log_no_error_text(caplog):
    clock = Clock()
    fake = FailingAsyncRedis(ERRORS[REFUSED])
    quotas = Quotas(fake, QuotaSettings(fallback_s=5.0), clock=clock)
    tenant = Tenant("acme", TenantLimits(requests_per_s=100))

    async def admit_three() -> None:
        for _ in range(3):
            await quotas.admit(tenant)  # on this replica's share: admitted, never an error

    with caplog.at_level(logging.INFO, logger="nlpmesh.gateway.quotas"):
        asyncio.run(admit_three())
        assert fake.command.calls == 1
        clock.now += 5.0
        asyncio.run(admit_three())
        assert fake.command.calls == 2  # tried again once the cooldown ended, then cooling down again
    assert SECRET not in caplog.text and "refused (ResponseError)" in caplog.text


def key() -> PromptCacheKey:
    return PromptCacheKey("acme", "m1", "r1", TemplatePrompt("capital", "1", {"country": "France"}),
                          Sampling(max_new_tokens=8))


ANSWER = CachedAnswer(text="Paris.", finish_reason=1, prompt_tokens=12, completion_tokens=2, model="m1")


def test_the_prompt_cache_misses_without_calling_redis_during_the_cooldown_and_logs_no_error_text(caplog):
    clock = Clock()
    fake = FailingAsyncRedis(ERRORS[UNREACHABLE])
    cache = PromptCache(fake, "test:pc", ttl_s=60, timeout_s=0.5, cooldown_s=1.0, clock=clock)

    async def use() -> None:
        assert await cache.lookup(key()) is None
        assert await cache.store(key(), ANSWER) is False
        assert await cache.add_hits(3) is False

    with caplog.at_level(logging.WARNING, logger="nlpmesh.cache"):
        asyncio.run(use())
        assert fake.command.calls == 1  # the lookup; the store and the count were skipped
        clock.now += 1.0
        asyncio.run(use())
        assert fake.command.calls == 2
    assert SECRET not in caplog.text and "pw" not in caplog.text
    assert "unreachable (ConnectionError)" in caplog.text


def test_a_prompt_cache_store_redis_refused_pauses_stores_but_not_lookups():
    clock = Clock()
    fake = FailingAsyncRedis(ERRORS[REFUSED])
    cache = PromptCache(fake, "test:pc", ttl_s=60, timeout_s=0.5, cooldown_s=1.0, clock=clock)

    async def use() -> None:
        assert await cache.store(key(), ANSWER) is False
        assert await cache.store(key(), ANSWER) is False
        assert await cache.lookup(key()) is None

    asyncio.run(use())
    assert fake.command.calls == 2  # one store, then the lookup


def test_a_lookup_cut_short_by_the_callers_own_budget_is_no_failure_of_redis():
    class SlowScript(FailingScript):
        async def __call__(self, *args, **kwargs):
            self.calls += 1
            await asyncio.sleep(1.0)

    fake = FailingAsyncRedis(ERRORS[TIMED_OUT])
    fake.command = SlowScript(ERRORS[TIMED_OUT])
    cache = PromptCache(fake, "test:pc", ttl_s=60, timeout_s=0.5, clock=Clock())

    async def use() -> None:
        assert await cache.lookup(key(), timeout_s=0.01) is None
        assert await cache.lookup(key(), timeout_s=0.01) is None

    asyncio.run(use())
    assert fake.command.calls == 2  # no cooldown: the second lookup was tried


def test_the_prefix_tier_skips_redis_during_the_cooldown_and_logs_no_error_text(caplog):
    clock = Clock()
    fake = FailingSyncRedis(ERRORS[TIMED_OUT])
    blocks = RedisBlocks("redis://127.0.0.1:1/0", cooldown_s=5.0, clock=clock, client=fake)
    try:
        with caplog.at_level(logging.WARNING, logger="nlpmesh.inference.prefix"):
            assert blocks.get([b"k" * 40]) is None
            assert blocks.get([b"k" * 40]) is None
            assert blocks.put([]).result() == []  # no write while cooling down
            assert fake.calls == 1
            clock.now += 5.0
            assert blocks.get([b"k" * 40]) is None
            assert fake.calls == 2
    finally:
        blocks.close()
    assert SECRET not in caplog.text and "timed out (TimeoutError)" in caplog.text
