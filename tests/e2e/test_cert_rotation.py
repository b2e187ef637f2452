"""Certificates rotated without a restart, over real processes (the TLS mesh `nlpmesh up` runs): a stream that
was running when `nlpmesh certs rotate` wrote new certificates finishes; new connections to the gateway and to an
internal service (mTLS) are then served the new certificates; no process was restarted."""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from cli.launcher import LocalMesh
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory, mesh_redis):
    local = LocalMesh(tmp_path_factory.mktemp("rotation-mesh"), free_ports=True, redis_url=mesh_redis.url,
                      tls=True, certs_dir=tmp_path_factory.mktemp("certs"),
                      progress=lambda line: print(f"[rotation-mesh] {line}"))
    local.start(ready_timeout_s=300)
    yield local
    local.stop()


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
    request = gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content="Explain bond ladders.")]),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=96), cache_mode=gateway_pb2.CACHE_MODE_BYPASS)
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
