"""The edge's certificate watcher: a rotated pair is served to new connections; a mismatched one is not."""
from __future__ import annotations

import contextlib
import ssl

from cryptography import x509

from cli.certs import init_certs, rotate_certs
from services.openai_edge.tls_reload import CertificateWatcher


def serial(path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def served_serial(context: ssl.SSLContext, ca_file) -> int:
    """The serial the context serves, read from a TLS handshake in memory."""
    client = ssl.create_default_context(cafile=str(ca_file))
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = context.wrap_bio(server_in, server_out, server_side=True)
    peer = client.wrap_bio(client_in, client_out, server_hostname="localhost")
    for _ in range(10):
        for side, out, into in ((peer, client_out, server_in), (server, server_out, client_in)):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
            into.write(out.read())
    return x509.load_der_x509_certificate(peer.getpeercert(binary_form=True)).serial_number


def test_a_rotated_pair_is_served_and_a_mismatched_one_is_not(tmp_path):
    init_certs(tmp_path)
    ca = tmp_path / "ca.crt"
    cert, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    watcher = CertificateWatcher(context, cert, key)
    first = serial(cert)
    assert served_serial(context, ca) == first and not watcher.check()  # nothing changed

    old_key = key.read_bytes()
    rotate_certs(tmp_path)
    assert watcher.check() and served_serial(context, ca) == serial(cert) != first

    rotated = serial(cert)
    key.write_bytes(old_key)  # a key that is not the certificate's
    assert not watcher.check() and served_serial(context, ca) == rotated
