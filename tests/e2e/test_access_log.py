"""The access log on a mesh started as a user starts it (`nlpmesh up`, TLS and API keys on): a Generate leaves
one INFO line in the gateway's log with its status, tokens and hops, the internal services each log the calls
they served for it at DEBUG, `nlpmesh logs --request-id` finds them all, and a failed call says its status."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from tests.launched import Launched, own_home
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

INTERNAL = ("template", "tokenizer", "cache", "inference")
# The gateway in JSON at INFO (its access lines parsed as they are shipped), the others in text at DEBUG.
ENV = {"NLPMESH_GATEWAY_LOG_FORMAT": "json",
       **{f"NLPMESH_{name.upper()}_LOG_LEVEL": "DEBUG" for name in INTERNAL}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    launched = Launched(own_home(tmp_path_factory.mktemp("home")), extra_env=ENV)
    try:
        yield launched.up()
    finally:
        launched.kill_everything()


@pytest.fixture(scope="module")
def gateway(mesh):
    with mesh.gateway_access().channel() as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def generate_request(template_id: str) -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": f"What is a bond, asks {uuid.uuid4().hex[:8]}?"})  # a miss: every hop runs
    return gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id=template_id, variables=variables),
                                       sampling=gateway_pb2.SamplingParams(max_new_tokens=4))


def access_lines(log: Path, request_id: str) -> list[dict]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "nlpmesh.access" and line["request_id"] == request_id]


def test_a_generate_leaves_one_access_line_and_its_calls_are_found_across_services(mesh, gateway):
    request_id = f"access-{uuid.uuid4().hex}"
    response = gateway.Generate(generate_request("finance_question"), timeout=120,
                                metadata=(("x-request-id", request_id),))
    log = mesh.log_path("gateway")
    wait_until(lambda: access_lines(log, request_id), 10, 0.1, what="the access line")
    (line,) = access_lines(log, request_id)
    assert (line["level"], line["method"], line["status"]) == ("INFO", "Generate", "OK")
    assert (line["tenant"], line["model"], line["template"]) == ("local", response.model, "finance_question")
    assert line["template_version"] not in ("", "-")  # "newest", resolved
    assert line["cache"] == "miss" and line["trace_id"] == response.trace_id
    assert (line["prompt_tokens"], line["completion_tokens"]) == (response.usage.prompt_tokens,
                                                                  response.usage.completion_tokens)
    hops = {timing.hop for timing in response.timings if timing.hop != "total"}
    assert set(line["hops"]) == hops and {"template", "tokenizer", "inference"} <= hops
    assert line["total_ms"] >= max(line["hops"].values())
    assert mesh.gateway_access().api_key not in log.read_text()  # the tenant, never the key

    # Each internal service's calls for it, at DEBUG, and the whole request by `nlpmesh logs`.
    wait_until(lambda: f"request_id={request_id}" in mesh.log_path("inference").read_text(), 10, 0.1,
               what="the inference service's call line")
    found = mesh.cli("logs", "--request-id", request_id)
    assert found.returncode == 0, found.stdout + found.stderr
    printed = found.stdout.splitlines()
    services = [entry.split()[0] for entry in printed]
    assert {"gateway", "template", "tokenizer", "inference"} <= set(services), found.stdout
    calls = [entry for entry in printed if "nlpmesh.calls: call" in entry]
    assert any(entry.startswith("template") and "method=Render status=OK" in entry for entry in calls), calls
    assert services.index("template") < max(i for i, s in enumerate(services) if s == "gateway")  # time order
    assert all(request_id in entry for entry in printed)


def test_a_failed_call_logs_its_status_code(mesh, gateway):
    request_id = f"access-fail-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as raised:
        gateway.Generate(generate_request("no_such_template"), timeout=60, metadata=(("x-request-id", request_id),))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    log = mesh.log_path("gateway")
    wait_until(lambda: access_lines(log, request_id), 10, 0.1, what="the access line")
    (line,) = access_lines(log, request_id)
    assert (line["status"], line["template"], line["tenant"]) == ("NOT_FOUND", "no_such_template", "local")
    assert line["completion_tokens"] == 0 and line["cache"] == "-"
