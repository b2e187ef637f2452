"""Tenant quotas at the gateway, over real in-process channels and a real Redis: the limits a key
carries are enforced, and a refusal says which limit and when to retry."""
from __future__ import annotations

import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2_grpc

from gateway.api_keys import create_key
from gateway.refusal_metrics import QUOTA_REFUSALS
from gateway.tenant import Tenant, TenantLimits
from tests.servicer.test_gateway_auth import auth_mesh, bearer, finance


def quota_details(error: grpc.aio.AioRpcError) -> tuple[list[str], float]:
    status = rpc_status.from_call(error)
    subjects, retry_s = [], 0.0
    for detail in status.details:
        failure, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
        if detail.Unpack(failure):
            subjects += [v.subject for v in failure.violations]
        elif detail.Unpack(retry):
            retry_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return subjects, retry_s


def test_a_tenant_over_its_requests_per_second_is_refused_with_the_limit_and_a_retry(
        inprocess_server, redis_server, tmp_path):
    _, limited = create_key(tmp_path / "keys.toml", Tenant(f"t{uuid.uuid4().hex[:8]}", TenantLimits(requests_per_s=2)))
    _, free = create_key(tmp_path / "keys.toml", Tenant("unlimited"))

    async def scenario(channel, tokenizer, inference):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        outcomes = []
        for _ in range(6):  # well within one second: a bucket of 2 cannot admit them all
            try:
                await stub.Generate(finance(), metadata=bearer(limited), timeout=5)
                outcomes.append("ok")
            except grpc.aio.AioRpcError as error:
                outcomes.append(error)
        for _ in range(6):  # another tenant is not held back by the first one's quota
            await stub.Generate(finance(), metadata=bearer(free), timeout=5)
        return outcomes

    counted = QUOTA_REFUSALS.labels("requests_per_s")._value.get()
    outcomes = auth_mesh(inprocess_server, redis_server, tmp_path, scenario)
    refusals = [o for o in outcomes if o != "ok"]
    assert 1 <= outcomes.count("ok") <= 3 and refusals  # 2 at once, and a third if the bucket refilled
    assert QUOTA_REFUSALS.labels("requests_per_s")._value.get() == counted + len(refusals)  # what the alert reads
    for error in refusals:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        subjects, retry_s = quota_details(error)
        assert subjects == ["tenant:requests_per_s"] and 0 < retry_s <= 1.0


def test_generated_tokens_count_against_the_tenants_tokens_per_minute(inprocess_server, redis_server, tmp_path):
    # The fake inference generates 3 tokens an answer: a limit of 5 admits two, then refuses.
    _, key = create_key(tmp_path / "keys.toml", Tenant(f"t{uuid.uuid4().hex[:8]}", TenantLimits(tokens_per_min=5)))

    async def scenario(channel, tokenizer, inference):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = await stub.Generate(finance("one?"), metadata=bearer(key), timeout=5)
        second = await stub.Generate(finance("two?"), metadata=bearer(key), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(finance("three?"), metadata=bearer(key), timeout=5)
        return first, second, caught.value, inference.calls

    first, second, error, inference_calls = auth_mesh(inprocess_server, redis_server, tmp_path, scenario)
    assert first.usage.completion_tokens + second.usage.completion_tokens == 6
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    subjects, retry_s = quota_details(error)
    assert subjects == ["tenant:tokens_per_min"] and 0 < retry_s <= 60
    assert inference_calls == 2  # the refused request never reached inference
