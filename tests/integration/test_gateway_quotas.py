"""Per-tenant quotas: two Quotas on one real redis-server are two gateway replicas (tests/conftest.py)."""
import asyncio
import logging
import math
import time
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.quotas import Quotas, QuotaSettings
from gateway.tenant import Tenant, TenantLimits
from meshkit.errors import ResourceExhausted, to_status
from promptcache.keys import tenant_tag
from promptcache.redis_tier import redis_client
from tests.conftest import until_redis_blocked
from tests.polling import until

TENANT_ID = "acme-corp-secret-looking-id"


def tenant(**limits) -> Tenant:
    return Tenant(TENANT_ID, TenantLimits(**limits))


class FrozenClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_replicas(url: str, body, count: int = 2, clock=time.monotonic, **settings):
    """Runs ``body(*replicas)`` in a fresh event loop: ``count`` Quotas sharing one Redis and one fresh prefix."""
    settings = QuotaSettings(key_prefix=f"test:q:{uuid.uuid4().hex}", **{"timeout_s": 0.5, **settings})

    async def main():
        replicas = [Quotas(redis_client(url, admin_timeout_s=0.5), settings, clock=clock) for _ in range(count)]
        try:
            return await body(*replicas)
        finally:
            for quotas in replicas:
                await quotas.close()
                await quotas.redis.aclose()

    return asyncio.run(main())


async def attempts(replicas, who: Tenant, count: int) -> tuple[list, list[ResourceExhausted]]:
    """``count`` admissions, round robin over ``replicas``: (admitted, refusals)."""
    admitted, refused = [], []
    for i in range(count):
        try:
            admitted.append(await replicas[i % len(replicas)].admit(who))
        except ResourceExhausted as error:
            refused.append(error)
    return admitted, refused


def subjects(error: ResourceExhausted) -> list[str]:
    return [v.subject for v in error.violations]


def test_a_tenant_without_limits_costs_no_redis_call():
    class NoRedis:
        def register_script(self, script):
            return self.never

        async def never(self, *args, **kwargs):
            raise AssertionError("Redis was called")

        zrem = script_load = never

    async def body():
        quotas = Quotas(NoRedis())
        for _ in range(5):
            async with await quotas.admit(Tenant("free")) as admission:
                await admission.record_tokens(1000)
        await quotas.record_tokens(tenant(requests_per_s=1.0), 1000)  # no token limit: nothing to count

    asyncio.run(body())


def test_two_replicas_share_the_requests_per_second_limit(redis_server):
    limit = 2  # the bucket holds one second's worth: 2 at once, then one every 0.5 s

    async def body(a, b):
        begun = time.monotonic()
        admitted, refused = await attempts([a, b], tenant(requests_per_s=float(limit)), 4 * limit)
        return len(admitted), refused, time.monotonic() - begun

    admitted, refused, elapsed = run_replicas(redis_server, body)
    assert elapsed < 2.0, "8 local round trips took over 2 s: the bounds below would not test anything"
    assert limit <= admitted <= limit + math.floor(elapsed * limit + 0.01)
    assert refused and all(subjects(error) == ["tenant:requests_per_s"] for error in refused)
    assert 0 < refused[0].retry_after_s <= 1.0 / limit


def test_two_replicas_share_the_tokens_per_minute_limit(redis_server):
    who = tenant(tokens_per_min=100)

    async def body(a, b):
        async with await a.admit(who) as admission:
            await admission.record_tokens(60)
        async with await b.admit(who) as admission:  # 60 < 100: still admitted
            await admission.record_tokens(50)
        refusals = []
        for replica in (a, b):
            with pytest.raises(ResourceExhausted) as refused:
                await replica.admit(who)
            refusals.append(refused.value)
        return refusals

    for error in run_replicas(redis_server, body):
        assert subjects(error) == ["tenant:tokens_per_min"]
        assert 0 < error.retry_after_s <= 60.0


def test_two_replicas_share_max_streams_and_a_release_frees_one(redis_server):
    who = tenant(max_streams=3)

    async def body(a, b):
        held = [await a.admit(who), await a.admit(who), await b.admit(who)]
        for replica in (a, b):
            with pytest.raises(ResourceExhausted) as refused:
                await replica.admit(who)
            assert subjects(refused.value) == ["tenant:max_streams"]
            assert refused.value.retry_after_s > 0
        await held[0].release()
        await held[0].release()  # idempotent: frees one stream, not two
        async with await b.admit(who):
            with pytest.raises(ResourceExhausted):
                await a.admit(who)
        async with await a.admit(who):  # leaving the block released the one before
            pass

    run_replicas(redis_server, body)


def test_a_crashed_replicas_streams_stop_counting_after_their_lease(redis_server):
    who = tenant(max_streams=2)

    async def body(crashed, survivor):
        await crashed.admit(who)
        await crashed.admit(who)
        await crashed.close()  # stops renewing without releasing, as a killed process would
        with pytest.raises(ResourceExhausted):
            await survivor.admit(who)
        async def admitted():
            try:
                return await survivor.admit(who)
            except ResourceExhausted:
                return None

        begun = time.monotonic()
        admission = await until(admitted, timeout_s=10.0, every_s=0.1,
                                what="the crashed replica's streams to stop counting after a 0.5 s lease")
        return admission, time.monotonic() - begun

    run_replicas(redis_server, body, stream_lease_s=0.5)


def test_a_live_replica_keeps_its_streams_past_the_lease_by_renewing(redis_server):
    who = tenant(max_streams=1)

    async def body(holder, other):
        async with await holder.admit(who):
            await asyncio.sleep(2.0)  # more than three leases
            with pytest.raises(ResourceExhausted):
                await other.admit(who)
        async with await other.admit(who):
            pass

    run_replicas(redis_server, body, stream_lease_s=0.6)


def test_a_refusal_reaches_the_caller_as_quota_failure_and_retry_info(redis_server):
    who = tenant(requests_per_s=1.0, max_streams=1)

    async def body(a, b):
        await a.admit(who)
        with pytest.raises(ResourceExhausted) as refused:
            await b.admit(who)
        return refused.value

    error = run_replicas(redis_server, body)

    class FailedCall(grpc.RpcError):
        def __init__(self, status):
            self.status = status

        def code(self):
            return self.status.code

        def details(self):
            return self.status.details

        def trailing_metadata(self):
            return self.status.trailing_metadata

    status = rpc_status.from_call(FailedCall(to_status(error)))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    failure, info = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(failure) and status.details[1].Unpack(info)
    assert sorted(v.subject for v in failure.violations) == ["tenant:max_streams", "tenant:requests_per_s"]
    assert 0 < info.retry_delay.ToMilliseconds() <= 1000
    assert TENANT_ID not in str(status) and tenant_tag(TENANT_ID) not in str(status)


def test_keys_hold_the_tenants_hash_in_one_hash_tag_never_its_id(redis_server):
    who = tenant(requests_per_s=5.0, tokens_per_min=100, max_streams=2)

    async def body(a, b):
        async with await a.admit(who) as admission:
            await admission.record_tokens(3)
            keys = await a.redis.keys(f"{a.settings.key_prefix}:*")
            return a.settings.key_prefix, sorted(k.decode() for k in keys)

    prefix, keys = run_replicas(redis_server, body)
    namespace = f"{prefix}:t:{{{tenant_tag(TENANT_ID)}}}"
    assert keys == [f"{namespace}:rps", f"{namespace}:streams", f"{namespace}:tok"]


@pytest.mark.parametrize("limits, replicas, share", [
    (dict(requests_per_s=10.0), 3, 3),
    (dict(requests_per_s=1.0), 3, 1),  # at least one where the limit is at least one
    (dict(requests_per_s=0.5), 2, 1),  # a quarter request per second: one now, the next in 4 s
    (dict(max_streams=4), 2, 2),
    (dict(max_streams=5), 2, 2),
    (dict(max_streams=1), 3, 1),
    (dict(max_streams=0), 2, 0),
])
def test_redis_unreachable_each_replica_admits_its_local_share_never_more(limits, replicas, share):
    dead = f"redis://127.0.0.1:{_closed_port()}/0"
    clock = FrozenClock()  # no refill while the loop runs: the share is exact

    async def body(quotas):
        admitted, refused = await attempts([quotas], tenant(**limits), 10 * max(share, 1))
        return len(admitted), refused

    admitted, refused = run_replicas(dead, body, count=1, clock=clock, replicas=replicas)
    assert admitted == share
    assert all("unreachable" in v.description for error in refused for v in error.violations)


def test_redis_unreachable_tokens_count_against_the_local_share():
    dead = f"redis://127.0.0.1:{_closed_port()}/0"
    who = tenant(tokens_per_min=100)

    async def body(quotas):
        async with await quotas.admit(who) as admission:
            await admission.record_tokens(49)
        async with await quotas.admit(who) as admission:  # 49 < 50, this replica's half
            await admission.record_tokens(1)
        with pytest.raises(ResourceExhausted) as refused:
            await quotas.admit(who)
        return refused.value

    error = run_replicas(dead, body, count=1, clock=FrozenClock(), replicas=2)
    assert subjects(error) == ["tenant:tokens_per_min"] and error.retry_after_s == 60.0


def test_redis_killed_holds_each_replica_to_its_share_and_warns_once(disposable_redis_server, caplog):
    who = tenant(max_streams=4, requests_per_s=100.0)
    clock = FrozenClock()

    async def body(a, b):
        held = [await a.admit(who), await b.admit(who)]  # shared: one each
        disposable_redis_server.stop()
        admitted, refused = await attempts([a], who, 40)
        return held, admitted, refused

    with caplog.at_level(logging.INFO, logger="nlpmesh.gateway.quotas"):
        _, admitted, refused = run_replicas(disposable_redis_server.url, body, clock=clock, replicas=2)
    assert len(admitted) == 1, "share 2 streams, one of them held since before Redis died"
    assert len(refused) == 39 and all(subjects(e) == ["tenant:max_streams"] for e in refused)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Redis failed" in warnings[0]
    assert TENANT_ID not in warnings[0] and tenant_tag(TENANT_ID) not in warnings[0]


def test_slow_redis_falls_back_to_the_local_share_within_the_timeout(disposable_redis_server):
    who = tenant(requests_per_s=100.0)

    async def body(quotas):
        blocker = redis_client(disposable_redis_server.url)
        sleeping = asyncio.create_task(blocker.execute_command("DEBUG", "SLEEP", "1"))
        await until_redis_blocked(disposable_redis_server.url)
        begun = time.monotonic()
        admitted, _ = await attempts([quotas], who, 10)
        elapsed = time.monotonic() - begun
        await sleeping
        await blocker.aclose()
        return len(admitted), elapsed

    admitted, elapsed = run_replicas(disposable_redis_server.url, body, count=1, timeout_s=0.05)
    assert admitted == 10  # local share 100 per second: a slow Redis fails no call
    assert elapsed < 0.8, "waited for Redis beyond the timeout"


def test_redis_back_returns_every_replica_to_the_shared_quota(disposable_redis_server, caplog):
    who = tenant(max_streams=4)

    async def body(a, b):
        disposable_redis_server.stop()
        local = [await a.admit(who), await a.admit(who)]  # a's share while Redis is down
        with pytest.raises(ResourceExhausted):
            await a.admit(who)
        disposable_redis_server.restart()
        await asyncio.sleep(0.3)  # past fallback_s
        streams = f"{a.settings.key_prefix}:t:{{{tenant_tag(TENANT_ID)}}}:streams"
        async def shared_again():
            return await a.redis.zcard(streams) >= 2

        await until(shared_again, timeout_s=5.0, every_s=0.05,
                    what="a's renewals to put the streams it held back in the shared count")
        shared = [await b.admit(who), await b.admit(who)]  # over b's share of 2 only if shared
        with pytest.raises(ResourceExhausted) as refused:
            await b.admit(who)
        for admission in local + shared:
            await admission.release()
        return refused.value, await a.redis.zcard(streams)

    with caplog.at_level(logging.INFO, logger="nlpmesh.gateway.quotas"):
        refused, left = run_replicas(disposable_redis_server.url, body, replicas=2, fallback_s=0.2,
                                     stream_lease_s=0.6)
    assert not any("unreachable" in v.description for v in refused.violations)
    assert left == 0
    assert any("answers again" in r.getMessage() for r in caplog.records)


def _closed_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_release_redis_missed_is_made_good_before_the_lease_runs_out(disposable_redis_server):
    who = tenant(max_streams=2)
    lease_s = 6.0  # renewals (and owed releases) every 2 s

    async def body(quotas):
        admission = await quotas.admit(who)
        admitted_at = time.monotonic()
        blocker = redis_client(disposable_redis_server.url)
        sleeping = asyncio.create_task(blocker.execute_command("DEBUG", "SLEEP", "0.5"))
        await until_redis_blocked(disposable_redis_server.url)
        await quotas.record_tokens(tenant(tokens_per_min=10), 1)  # times out: Redis skipped for fallback_s
        await admission.release()  # skipped: Redis still counts the stream
        await sleeping
        await blocker.aclose()
        streams = f"{quotas.settings.key_prefix}:t:{{{tenant_tag(TENANT_ID)}}}:streams"
        async def released():
            return await quotas.redis.zcard(streams) == 0

        await until(released, timeout_s=admitted_at + lease_s * 0.75 - time.monotonic(), every_s=0.1,
                    what="the owed release to be made good before the lease runs out")
        return await quotas.redis.zcard(streams)

    assert run_replicas(disposable_redis_server.url, body, count=1, timeout_s=0.05, fallback_s=0.5,
                        stream_lease_s=lease_s) == 0
