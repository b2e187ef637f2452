"""The shared runtime: the error table, rich details, settings precedence, initial metadata beside the work."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from pydantic import ValidationError

from meshkit import errors
from meshkit.server import initial_metadata_meanwhile
from meshkit.settings import ServiceSettings


class DemoSettings(ServiceSettings, service="demo"):
    threads: int = 1
    label: str = "default"


def details_of(status: grpc.Status) -> status_pb2.Status:
    [(key, value)] = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


@pytest.mark.parametrize("error, code", [
    (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (errors.Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded("x", hop="template"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
])
def test_each_domain_error_maps_to_its_status_code(error, code):
    assert errors.to_status(error).code == code


def test_invalid_argument_carries_bad_request_naming_each_field():
    error = errors.InvalidArgument("two problems", [errors.FieldViolation("a", "bad"), errors.FieldViolation("b", "worse")])
    bad = error_details_pb2.BadRequest()
    assert details_of(errors.to_status(error)).details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [("a", "bad"), ("b", "worse")]


def test_resource_exhausted_carries_retry_info():
    info = error_details_pb2.RetryInfo()
    assert details_of(errors.to_status(errors.ResourceExhausted("full", retry_after_s=0.25))).details[0].Unpack(info)
    assert info.retry_delay.ToMilliseconds() == 250


def test_resource_exhausted_carries_quota_failure_naming_each_limit_then_retry_info():
    error = errors.ResourceExhausted("over quota", retry_after_s=0.1, violations=[
        errors.QuotaViolation("tenant:requests_per_s", "over 5 requests per second"),
        errors.QuotaViolation("tenant:max_streams", "2 streams at once"),
    ])
    status = errors.to_status(error)
    failure, info = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    quota_detail, retry_detail = details_of(status).details
    assert quota_detail.Unpack(failure) and retry_detail.Unpack(info)
    assert [(v.subject, v.description) for v in failure.violations] == [
        ("tenant:requests_per_s", "over 5 requests per second"), ("tenant:max_streams", "2 streams at once")]
    assert info.retry_delay.ToMilliseconds() == 100  # rounded up, never down


def test_resource_exhausted_without_violations_or_retry_has_no_details():
    assert details_of(errors.to_status(errors.ResourceExhausted("full"))).details == []


class FailedCall(grpc.RpcError):
    """What a stub raises: the code, message and trailing metadata of a status."""

    def __init__(self, status: grpc.Status):
        self._status = status

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


def test_a_quota_failure_keeps_its_violations_and_retry_info_across_a_hop():
    sent = errors.ResourceExhausted("over quota", retry_after_s=1.5,
                                    violations=[errors.QuotaViolation("tenant:tokens_per_min", "over 100 tokens")])
    received = errors.from_rpc_error(FailedCall(errors.to_status(sent)), hop="inference")
    assert isinstance(received, errors.ResourceExhausted)
    assert received.message == "over quota"
    assert received.violations == sent.violations
    assert received.retry_after_s == 1.5
    assert details_of(errors.to_status(received)) == details_of(errors.to_status(sent))


def test_a_bad_request_keeps_its_field_violations_across_a_hop():
    sent = errors.InvalidArgument.for_field("variables.country", "required")
    received = errors.from_rpc_error(FailedCall(errors.to_status(sent)), hop="template")
    assert isinstance(received, errors.InvalidArgument)
    assert received.violations == sent.violations


def test_deadline_exceeded_names_the_hop_in_error_info():
    info = error_details_pb2.ErrorInfo()
    assert details_of(errors.to_status(errors.DeadlineExceeded("late", hop="inference"))).details[0].Unpack(info)
    assert info.metadata["hop"] == "inference"


def failed_call(code: grpc.StatusCode, message: str, *details) -> FailedCall:
    """A downstream's failure carrying exactly ``details`` (google.rpc messages)."""
    packed = []
    for detail in details:
        packed.append(any_pb2.Any())
        packed[-1].Pack(detail)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=packed)
    return FailedCall(rpc_status.to_status(status))


def retry_in(ms: int) -> error_details_pb2.RetryInfo:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromMilliseconds(ms)
    return info


def test_every_detail_of_a_refusal_reaches_the_caller_as_sent():
    sent = [retry_in(250), error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="x.dev", metadata={"depth": "9"}),
            error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(subject="s")])]
    received = errors.from_rpc_error(failed_call(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", *sent), hop="inference")
    assert isinstance(received, errors.ResourceExhausted) and received.retry_after_s == 0.25
    relayed = details_of(errors.to_status(received)).details
    assert [d.TypeName() for d in relayed] == [type(m).DESCRIPTOR.full_name for m in sent]
    for detail, message in zip(relayed, sent):
        assert detail.value == message.SerializeToString()


def test_a_downstream_bug_relays_neither_message_nor_details():
    call = failed_call(grpc.StatusCode.INTERNAL, "Traceback ...", error_details_pb2.ErrorInfo(reason="BUG"))
    received = errors.from_rpc_error(call, hop="tokenizer")
    status = errors.to_status(received)
    assert status.code == grpc.StatusCode.INTERNAL and "Traceback" not in status.details
    assert details_of(status).details == []


def test_debug_info_never_crosses_a_hop():
    call = failed_call(grpc.StatusCode.NOT_FOUND, "no such template",
                       error_details_pb2.DebugInfo(stack_entries=["File x.py"]), error_details_pb2.ErrorInfo(reason="R"))
    relayed = details_of(errors.to_status(errors.from_rpc_error(call, hop="template"))).details
    assert [d.TypeName() for d in relayed] == ["google.rpc.ErrorInfo"]


def test_a_downstream_deadline_names_this_hop_first_and_keeps_the_downstreams_details():
    call = failed_call(grpc.StatusCode.DEADLINE_EXCEEDED, "late", retry_in(100))
    details = details_of(errors.to_status(errors.from_rpc_error(call, hop="tokenizer"))).details
    info = error_details_pb2.ErrorInfo()
    assert details[0].Unpack(info) and info.metadata["hop"] == "tokenizer"
    assert [d.TypeName() for d in details[1:]] == ["google.rpc.RetryInfo"]


def test_a_downstream_services_own_deadline_refusal_keeps_its_words_and_facts_and_a_timeout_does_not():
    refusal = errors.DeadlineExceeded("waited 120 ms in the queue", hop="inference", facts={"queue_wait_ms": "120"})
    [packed] = refusal.details()
    own = error_details_pb2.ErrorInfo()
    assert packed.Unpack(own)
    mapped = errors.from_rpc_error(failed_call(grpc.StatusCode.DEADLINE_EXCEEDED, refusal.message, own),
                                   hop="inference")
    assert mapped.message == "waited 120 ms in the queue"
    relayed = details_of(errors.to_status(mapped)).details
    infos = [error_details_pb2.ErrorInfo() for _ in relayed]
    assert all(detail.Unpack(info) for detail, info in zip(relayed, infos))
    assert infos[-1].metadata["queue_wait_ms"] == "120" and infos[0].metadata["hop"] == "inference"
    # a deadline that simply passed (no mesh service said why) stays the gateway's own words
    late = errors.from_rpc_error(failed_call(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), hop="inference")
    assert late.message == "the inference hop ran out of time"


def test_a_resource_exhausted_reason_is_an_error_info():
    status = errors.to_status(errors.ResourceExhausted("busy", retry_after_s=1, reason="GATEWAY_AT_CAPACITY"))
    info = error_details_pb2.ErrorInfo()
    assert details_of(status).details[0].Unpack(info)
    assert (info.reason, info.domain) == ("GATEWAY_AT_CAPACITY", errors.ERROR_DOMAIN)


def test_settings_env_beats_file_beats_default(tmp_path, monkeypatch):
    config = tmp_path / "nlpmesh.toml"
    config.write_text('[demo]\nthreads = 4\nlabel = "from-file"\n')
    monkeypatch.setenv("NLPMESH_CONFIG", str(config))
    monkeypatch.setenv("NLPMESH_DEMO_LABEL", "from-env")
    settings = DemoSettings.load()
    assert (settings.threads, settings.label) == (4, "from-env")


def test_settings_are_frozen():
    settings = DemoSettings.load()
    with pytest.raises(ValidationError):
        settings.threads = 3


def test_a_missing_config_file_is_an_error_not_a_silent_default(monkeypatch, tmp_path):
    monkeypatch.setenv("NLPMESH_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(FileNotFoundError):
        DemoSettings.load()


class HeadersContext:
    """A served call's context whose header write takes a while and says when it began and ended."""

    def __init__(self, events: list[str], fails: bool = False):
        self._events, self._fails = events, fails

    async def send_initial_metadata(self, metadata):
        self._events.append("headers begun")
        await asyncio.sleep(0.05)
        if self._fails:
            self._events.append("headers failed")
            raise RuntimeError("the caller went away")
        self._events.append("headers sent")


def test_initial_metadata_goes_out_while_the_handler_works_and_before_the_block_ends():
    events: list[str] = []

    async def handler():
        async with initial_metadata_meanwhile(HeadersContext(events), (("x-request-id", "r1"),)):
            await asyncio.sleep(0)
            events.append("hop started")
        events.append("answered")

    asyncio.run(handler())
    assert events == ["headers begun", "hop started", "headers sent", "answered"]


def test_a_stream_awaits_the_headers_before_its_first_message():
    events: list[str] = []

    async def handler():
        async with initial_metadata_meanwhile(HeadersContext(events), ()) as sent:
            events.append("hop started")
            await sent
            events.append("first message")

    asyncio.run(handler())
    assert events == ["hop started", "headers begun", "headers sent", "first message"]


def test_a_failed_header_write_raises_when_the_block_ends():
    async def handler():
        async with initial_metadata_meanwhile(HeadersContext([], fails=True), ()):
            pass

    with pytest.raises(RuntimeError, match="went away"):
        asyncio.run(handler())


def test_the_handlers_own_error_wins_over_a_failed_header_write_which_it_still_waits_for():
    events: list[str] = []

    async def handler():
        async with initial_metadata_meanwhile(HeadersContext(events, fails=True), ()):
            raise errors.NotFound("no such template")

    with pytest.raises(errors.NotFound):
        asyncio.run(handler())
    assert events == ["headers begun", "headers failed"]  # the write ended before the error went on
