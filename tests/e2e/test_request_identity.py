"""Request identity end to end: the caller's x-request-id in every service's log lines, JSON logs by setting."""
from __future__ import annotations

import json
import uuid

import grpc
import pytest
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from cli.launcher import LocalMesh
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

SERVICES = ("gateway", "template", "tokenizer", "cache", "inference", "embedding")
JSON_LOGS = {f"NLPMESH_{name.upper()}_LOG_FORMAT": "json" for name in SERVICES}
JSON_LOGS |= {f"NLPMESH_{name.upper()}_LOG_LEVEL": "DEBUG" for name in ("gateway", "inference")}
KEYS = {"ts", "level", "logger", "message", "request_id", "trace_id"}


@pytest.fixture(scope="module")
def json_mesh(tmp_path_factory, mesh_redis):
    local = LocalMesh(tmp_path_factory.mktemp("mesh"), free_ports=True, redis_url=mesh_redis.url,
                      extra_env=JSON_LOGS, progress=lambda line: print(f"[mesh] {line}"))
    local.start(ready_timeout_s=300)
    yield local
    local.stop()


def log_records(mesh: LocalMesh, name: str) -> list[dict]:
    return [json.loads(line) for line in mesh.log_path(name).read_text().splitlines() if line.strip()]


def wait_for_records(mesh: LocalMesh, name: str, request_id: str, timeout_s: float = 10.0) -> list[dict]:
    return wait_until(lambda: [r for r in log_records(mesh, name) if r["request_id"] == request_id], timeout_s, 0.05,
                      what=f"a {name} log line carrying request id {request_id}")


def test_the_callers_request_id_and_trace_id_reach_the_gateway_and_inference_logs(json_mesh):
    request_id = f"e2e-{uuid.uuid4().hex}"
    canary = f"canary-{uuid.uuid4().hex}"
    request = gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=f"Repeat the word {canary}.")]),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=4), cache_mode=gateway_pb2.CACHE_MODE_BYPASS)
    with grpc.insecure_channel(json_mesh.gateway_address) as channel:
        reply, call = gateway_pb2_grpc.GatewayStub(channel).Generate.with_call(
            request, timeout=120, metadata=(("x-request-id", request_id),))
    assert dict(call.initial_metadata())["x-request-id"] == request_id
    for name in ("gateway", "inference"):
        tagged = wait_for_records(json_mesh, name, request_id)
        assert {r["trace_id"] for r in tagged} == {reply.trace_id}, name
    for name in SERVICES:  # every line of every service is one JSON object with every key
        records = log_records(json_mesh, name)
        assert records and all(record.keys() >= KEYS for record in records), name
        assert canary not in json_mesh.log_path(name).read_text(), f"prompt text in the {name} log"
