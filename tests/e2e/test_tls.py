"""TLS at the gateway, mTLS inside, over real processes: who gets through and who does not.

The mesh is the one `nlpmesh up` runs (LocalMesh with tls on), with certificates made by
`nlpmesh certs init` in a folder of its own; the foreign certificate comes from another CA
made here with the same module.
"""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from cli.certs import issue, make_authority, write_pair
from cli.main import main
from cli.topology import REPO_ROOT
from meshkit.tls import TlsConfig

pytestmark = [pytest.mark.e2e, pytest.mark.model]

INTERNAL = ("template", "tokenizer", "cache", "inference")


@pytest.fixture(scope="module")
def foreign_client(tmp_path_factory, tls_mesh) -> grpc.ChannelCredentials:
    """Trusts the mesh's servers, but presents a certificate another CA signed, under the gateway's names."""
    folder = tmp_path_factory.mktemp("foreign")
    authority = make_authority("another CA")
    cert, key = issue(authority, "gateway", ["gateway", "localhost"], ["127.0.0.1"])
    write_pair(folder, "gateway", cert, key)
    return grpc.ssl_channel_credentials((tls_mesh.tls_dir / "ca.crt").read_bytes(),
                                        (folder / "gateway.key").read_bytes(), (folder / "gateway.crt").read_bytes())


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    return grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)


def _health_code(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    with _channel(address, credentials) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _model_info_code(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    with _channel(address, credentials) as channel:
        try:
            reply = inference_pb2_grpc.InferenceServiceStub(channel).ModelInfo(inference_pb2.ModelInfoRequest(),
                                                                               timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    return "OK" if reply.model else "EMPTY"


def test_a_generate_through_the_tls_gateway_reaches_every_internal_service(tls_mesh):
    request = gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content="Say hello.")]),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=8),
        cache_mode=gateway_pb2.CACHE_MODE_REFRESH,
    )
    with tls_mesh.gateway_access().channel() as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120)
    assert reply.text
    assert {"tokenizer", "inference"} <= {t.hop for t in reply.timings}


def test_nlpmesh_health_reports_serving_for_every_service_with_the_probe_certificate(tls_mesh, capsys):
    for name in (*INTERNAL, "gateway"):
        assert main(["health", "--addr", tls_mesh.address(name), "--tls-dir", str(tls_mesh.tls_dir)]) == 0, name
        assert capsys.readouterr().out.strip() == "SERVING", name


def test_the_compose_healthcheck_command_finds_the_certificates_in_nlpmesh_tls_dir(tls_mesh):
    env = {**os.environ, "NLPMESH_TLS_DIR": str(tls_mesh.tls_dir),
           "PYTHONPATH": os.pathsep.join((str(REPO_ROOT), str(REPO_ROOT / "gen")))}
    probe = subprocess.run([sys.executable, "-m", "cli.main", "health", "--addr", tls_mesh.address("inference")],
                           env=env, capture_output=True, text=True, timeout=60)
    assert (probe.returncode, probe.stdout.strip()) == (0, "SERVING"), probe.stderr


def test_a_plaintext_client_is_refused_by_the_tls_gateway(tls_mesh):
    assert _health_code(tls_mesh.gateway_address, None) == "UNAVAILABLE"
    with grpc.insecure_channel(tls_mesh.gateway_address) as channel, pytest.raises(grpc.RpcError) as refused:
        gateway_pb2_grpc.GatewayStub(channel).ListTemplates(gateway_pb2.ListTemplatesRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused_by_every_internal_service(tls_mesh, foreign_client):
    mesh_client = TlsConfig.from_dir(tls_mesh.tls_dir, "gateway").channel_credentials()
    for name in INTERNAL:
        assert _health_code(tls_mesh.address(name), mesh_client) == "SERVING", name  # the same call, mesh-signed
        assert _health_code(tls_mesh.address(name), foreign_client) == "UNAVAILABLE", name
    assert _model_info_code(tls_mesh.address("inference"), foreign_client) == "UNAVAILABLE"


def test_a_process_without_a_client_certificate_cannot_call_inference(tls_mesh):
    address = tls_mesh.address("inference")
    trusts_the_mesh = grpc.ssl_channel_credentials((tls_mesh.tls_dir / "ca.crt").read_bytes())
    assert _model_info_code(address, None) == "UNAVAILABLE"
    assert _model_info_code(address, trusts_the_mesh) == "UNAVAILABLE"
    assert _model_info_code(address, TlsConfig.from_dir(tls_mesh.tls_dir, "gateway").channel_credentials()) == "OK"
