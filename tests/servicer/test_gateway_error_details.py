"""Every google.rpc detail an internal service sends reaches the gateway's caller, over real channels."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2

from meshkit.errors import FieldViolation, InvalidArgument, QuotaViolation, ResourceExhausted
from tests.servicer.gateway_mesh import run_mesh


def bypassing_request() -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": "What is a bond?"})
    return gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
                                       cache_mode=gateway_pb2.CACHE_MODE_BYPASS)


def refused_with(inprocess_server, redis_url: str, failure: Exception, streaming: bool) -> grpc.aio.AioRpcError:
    async def scenario(stub, tokenizer, inference):
        inference.fail_with = failure
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if streaming:
                _ = [chunk async for chunk in stub.GenerateStream(bypassing_request())]
            else:
                await stub.Generate(bypassing_request())
        return caught.value

    return run_mesh(inprocess_server, redis_url, scenario)


def details_by_type(error: grpc.aio.AioRpcError) -> dict[str, any_pb2.Any]:
    status = rpc_status.from_call(error)
    assert status is not None, "the caller got no google.rpc.Status"
    return {detail.TypeName(): detail for detail in status.details}


def unpacked(detail: any_pb2.Any, message_type):
    message = message_type()
    assert detail.Unpack(message)
    return message


@pytest.mark.parametrize("streaming", [False, True])
def test_a_full_queue_reaches_the_caller_with_retry_info_and_error_info(inprocess_server, redis_server, streaming):
    full = ResourceExhausted("the inference queue is full", retry_after_s=0.75, reason="INFERENCE_QUEUE_FULL")
    error = refused_with(inprocess_server, redis_server, full, streaming)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "the inference queue is full"
    details = details_by_type(error)
    assert set(details) == {"google.rpc.RetryInfo", "google.rpc.ErrorInfo"}
    assert unpacked(details["google.rpc.RetryInfo"], error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() == 750
    info = unpacked(details["google.rpc.ErrorInfo"], error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INFERENCE_QUEUE_FULL", "nlpmesh.dev")


def test_a_quota_failure_reaches_the_caller_with_its_violations(inprocess_server, redis_server):
    over = ResourceExhausted("over quota", retry_after_s=2, violations=[QuotaViolation("tenant:gpu_s", "over 10 s")])
    details = details_by_type(refused_with(inprocess_server, redis_server, over, streaming=False))
    assert set(details) == {"google.rpc.QuotaFailure", "google.rpc.RetryInfo"}
    failure = unpacked(details["google.rpc.QuotaFailure"], error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in failure.violations] == [("tenant:gpu_s", "over 10 s")]


def test_a_bad_request_reaches_the_caller_with_every_field(inprocess_server, redis_server):
    bad = InvalidArgument("two fields", [FieldViolation("prompt", "too long"), FieldViolation("sampling.top_k", "big")])
    error = refused_with(inprocess_server, redis_server, bad, streaming=True)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = unpacked(details_by_type(error)["google.rpc.BadRequest"], error_details_pb2.BadRequest)
    assert [v.field for v in request.field_violations] == ["prompt", "sampling.top_k"]
