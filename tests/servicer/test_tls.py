"""meshkit's servers over TLS: the settings turn it on, and an internal service admits only mesh clients."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.certs import init_certs, issue, make_authority, write_pair
from meshkit.server import ServiceSpec, create_server
from meshkit.settings import ServiceSettings
from meshkit.tls import TlsConfig, probe_credentials


class InternalSettings(ServiceSettings, service="inference"):
    pass


class EdgeSettings(ServiceSettings, service="gateway"):
    tls_require_client_cert: bool = False


SPEC = ServiceSpec(name="tls-test", service_names=(), register=lambda server: None)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    init_certs(folder)
    return folder


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A client certificate from another CA, with the names of a mesh service."""
    folder = tmp_path_factory.mktemp("foreign")
    authority = make_authority("not the mesh")
    cert, key = issue(authority, "gateway", ["gateway", "localhost"], ["127.0.0.1"])
    write_pair(folder, "gateway", cert, key)
    write_pair(folder, "ca", authority.cert, authority.key)
    return folder


async def _health(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    channel = (grpc.aio.secure_channel(address, credentials) if credentials
               else grpc.aio.insecure_channel(address))
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _statuses(settings: ServiceSettings, *credentials: grpc.ChannelCredentials | None) -> list[str]:
    """What a health check with each of ``credentials`` gets from a server made with ``settings``."""

    async def main():
        server, port, _ = await create_server(SPEC, settings.model_copy(update={"port": 0}))
        try:
            return [await _health(f"127.0.0.1:{port}", c) for c in credentials]
        finally:
            await server.stop(None)

    return asyncio.run(main())


def _ca_only(certs) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes())


def _mesh_ca_with_foreign_cert(certs, foreign) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes(), (foreign / "gateway.key").read_bytes(),
                                        (foreign / "gateway.crt").read_bytes())


def test_an_internal_service_admits_only_clients_with_a_mesh_certificate(certs, foreign):
    # NOT_SERVING: the call got through (the port is up; nothing warmed it). UNAVAILABLE: the handshake failed.
    assert _statuses(InternalSettings(tls_dir=str(certs)),
                     probe_credentials(certs),
                     TlsConfig.from_dir(certs, "gateway").channel_credentials(),
                     None,
                     _ca_only(certs),
                     _mesh_ca_with_foreign_cert(certs, foreign)) == [
        "NOT_SERVING", "NOT_SERVING", "UNAVAILABLE", "UNAVAILABLE", "UNAVAILABLE"]


def test_the_edge_serves_tls_to_any_client_that_trusts_it_and_refuses_plaintext(certs):
    assert _statuses(EdgeSettings(tls_dir=str(certs)), _ca_only(certs), None) == ["NOT_SERVING", "UNAVAILABLE"]


def test_a_client_that_trusts_another_ca_refuses_the_mesh_server(certs, foreign):
    other = grpc.ssl_channel_credentials((foreign / "ca.crt").read_bytes())
    assert _statuses(EdgeSettings(tls_dir=str(certs)), other) == ["UNAVAILABLE"]


def test_no_tls_settings_serve_plaintext():
    assert _statuses(InternalSettings(), None) == ["NOT_SERVING"]


def test_the_mesh_folder_comes_from_one_variable_and_a_named_file_wins(monkeypatch, certs, tmp_path):
    monkeypatch.setenv("NLPMESH_TLS_DIR", str(certs))
    monkeypatch.setenv("NLPMESH_INFERENCE_TLS_CA_FILE", str(tmp_path / "other-ca.crt"))
    tls = TlsConfig.from_settings(InternalSettings.load())
    assert tls.cert_file == certs / "inference.crt" and tls.key_file == certs / "inference.key"
    assert tls.ca_file == tmp_path / "other-ca.crt"
    assert tls.require_client_cert


def test_half_a_configuration_is_an_error_not_plaintext(certs):
    with pytest.raises(ValueError):
        TlsConfig.from_settings(InternalSettings(tls_cert_file=str(certs / "inference.crt")))
    with pytest.raises(ValueError):  # an internal service must be able to verify its clients
        TlsConfig.from_settings(InternalSettings(tls_cert_file=str(certs / "inference.crt"),
                                                 tls_key_file=str(certs / "inference.key")))


def test_a_missing_certificate_file_stops_the_start(tmp_path):
    with pytest.raises(FileNotFoundError):
        _statuses(InternalSettings(tls_dir=str(tmp_path)))
