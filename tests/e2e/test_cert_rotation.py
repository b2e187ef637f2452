"""Certificates rotated without a restart, over real processes (the TLS mesh `nlpmesh up` runs): a stream that
was running when `nlpmesh certs rotate` wrote new certificates finishes; new connections to the gateway and to an
internal service (mTLS) are then served the new certificates; then a whole new CA (`nlpmesh certs init --force`)
is taken up by the servers and by the gateway as a client of the internal services; no process was restarted."""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from tests.e2e.conftest import started_tls_mesh
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

RELOAD_S = 1  # the gateway reads its TLS files this often here (NLPMESH_GATEWAY_TLS_RELOAD_S; 10 s by default)
# The tokenizer ends each connection this soon (GOAWAY), so the gateway must connect again, with whatever
# credentials its channel holds: after a new CA, only the new ones get through.
CONNECTION_AGE_S = 3


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory, mesh_redis):
    local = started_tls_mesh(tmp_path_factory, mesh_redis.url, {
        "NLPMESH_GATEWAY_TLS_RELOAD_S": str(RELOAD_S),
        "NLPMESH_TOKENIZER_MAX_CONNECTION_AGE_S": str(CONNECTION_AGE_S),
        "NLPMESH_TOKENIZER_MAX_CONNECTION_AGE_GRACE_S": "1"})
    yield local
    local.stop()


def chat_request(max_new_tokens: int = 96) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content="Explain bond ladders.")]),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens), cache_mode=gateway_pb2.CACHE_MODE_BYPASS)


def served_serial(port: int, certs: Path, client: str | None = None) -> int:
    """The serial of the certificate a new TLS connection to ``port`` is served (gRPC's ALPN, the mesh CA;
    ``client``: the certificate presented, for an mTLS service)."""
    context = ssl.create_default_context(cafile=certs / "ca.crt")
    context.set_alpn_protocols(["h2"])
    if client:
        context.load_cert_chain(certs / f"{client}.crt", certs / f"{client}.key")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def file_serial(certs: Path, name: str) -> int:
    return x509.load_pem_x509_certificate((certs / f"{name}.crt").read_bytes()).serial_number


def test_a_rotation_mid_stream_lets_the_stream_finish_and_new_connections_get_the_new_certificates(tls_mesh):
    certs, ports = tls_mesh.tls_dir, tls_mesh.ports
    pids = {name: process.pid for name, process in tls_mesh.processes.items()}
    old = {"gateway": file_serial(certs, "gateway"), "tokenizer": file_serial(certs, "tokenizer"),
           "edge": file_serial(certs, "edge")}
    assert served_serial(ports["gateway"], certs) == old["gateway"]
    assert served_serial(ports["edge"], certs) == old["edge"]  # the OpenAI edge's HTTPS port
    assert served_serial(ports["tokenizer"], certs, client="probe") == old["tokenizer"]
    request = chat_request()
    with tls_mesh.gateway_access().channel() as channel:
        chunks = gateway_pb2_grpc.GatewayStub(channel).GenerateStream(request, timeout=300)
        first = next(chunks)
        rotated = subprocess.run([sys.executable, "-m", "cli.main", "certs", "rotate", "--dir", str(certs)],
                                 capture_output=True, text=True, timeout=60)
        assert rotated.returncode == 0, rotated.stderr
        rest = list(chunks)
    assert first.delta and rest[-1].done and rest[-1].usage.completion_tokens > 1  # the stream finished
    new = {"gateway": file_serial(certs, "gateway"), "tokenizer": file_serial(certs, "tokenizer")}
    assert new["gateway"] != old["gateway"] and new["tokenizer"] != old["tokenizer"]
    wait_until(lambda: served_serial(ports["gateway"], certs) == new["gateway"], timeout_s=10,
               what="the gateway to serve its new certificate")
    assert served_serial(ports["tokenizer"], certs, client="probe") == new["tokenizer"]
    wait_until(lambda: served_serial(ports["edge"], certs) == file_serial(certs, "edge") != old["edge"], timeout_s=10,
               what="the edge to serve its new certificate")
    with tls_mesh.gateway_access().channel() as channel:  # a new connection, through every hop
        reply = gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=300)
    assert reply.text
    assert {name: process.pid for name, process in tls_mesh.processes.items()} == pids
    assert all(process.poll() is None for process in tls_mesh.processes.values())  # none restarted, none died


def test_a_new_ca_is_taken_up_by_the_servers_and_by_the_gateway_as_a_client_without_a_restart(tls_mesh):
    certs = tls_mesh.tls_dir
    pids = {name: process.pid for name, process in tls_mesh.processes.items()}
    old_ca = (certs / "ca.crt").read_bytes()
    made = subprocess.run([sys.executable, "-m", "cli.main", "certs", "init", "--force", "--dir", str(certs)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (certs / "ca.crt").read_bytes() != old_ca

    def answered() -> str | None:
        """A new connection trusting only the new CA; the gateway reaches the internal services, which now
        ask for a client certificate of the new CA, only once it has taken up its new files."""
        try:
            with tls_mesh.gateway_access().channel() as channel:
                return gateway_pb2_grpc.GatewayStub(channel).Generate(chat_request(8), timeout=30).text or None
        except grpc.RpcError:
            return None
    assert wait_until(answered, timeout_s=120, every_s=1, what="an answer under the new CA")
    time.sleep(2 * CONNECTION_AGE_S)  # every connection of the old credentials to the tokenizer has ended
    assert answered(), "the gateway's new connections to the tokenizer were refused: it kept the old credentials"
    assert served_serial(tls_mesh.ports["inference"], certs, client="probe") == file_serial(certs, "inference")
    assert {name: process.pid for name, process in tls_mesh.processes.items()} == pids
    assert all(process.poll() is None for process in tls_mesh.processes.values())
