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
