"""The shared runtime: the error table, rich details, settings precedence."""
from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from pydantic import ValidationError

from meshkit import errors
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
