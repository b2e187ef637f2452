"""TLS for every process: what a server presents and whom it accepts; how a client verifies and presents.

One ``TlsConfig`` per process, from its settings:

- ``tls_cert_file`` / ``tls_key_file``: the certificate this server presents; the gateway
  presents the same one as a client of the internal services. Empty = plaintext.
- ``tls_ca_file``: the mesh CA. A server with ``tls_require_client_cert`` (the default for
  every service but the gateway) accepts only clients that present a certificate this CA
  signed; a client (the gateway) verifies the servers it calls against it, and without it
  calls them in plaintext.
- ``NLPMESH_TLS_DIR`` (``tls_dir``): one folder for the whole mesh, laid out as
  ``nlpmesh certs init`` makes it: ``<service>.crt``, ``<service>.key`` and ``ca.crt``.
  A file named on its own wins over the folder.

Files are read when the credentials are built, at start: a missing file stops the
process rather than leaving it in plaintext.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

CA_FILE = "ca.crt"
PROBE = "probe"  # the client certificate health checks present


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    def __post_init__(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS needs both a certificate and its key (tls_cert_file, tls_key_file)")
        if self.cert_file is not None and self.require_client_cert and self.ca_file is None:
            raise ValueError("requiring client certificates needs the CA that signs them (tls_ca_file)")

    @classmethod
    def from_settings(cls, settings) -> TlsConfig:
        """From a ServiceSettings: its own files, else those ``tls_dir`` holds for its service."""
        folder = Path(settings.tls_dir) if settings.tls_dir else None
        base = cls.from_dir(folder, settings.service) if folder else cls()

        def chosen(explicit: str, from_dir: Path | None) -> Path | None:
            return Path(explicit) if explicit else from_dir

        return cls(chosen(settings.tls_cert_file, base.cert_file), chosen(settings.tls_key_file, base.key_file),
                   chosen(settings.tls_ca_file, base.ca_file), settings.tls_require_client_cert)

    @classmethod
    def from_dir(cls, folder: Path, name: str, require_client_cert: bool = False) -> TlsConfig:
        """``<folder>/<name>.crt`` and ``.key``, with ``<folder>/ca.crt``."""
        folder = Path(folder)
        return cls(folder / f"{name}.crt", folder / f"{name}.key", folder / CA_FILE, require_client_cert)

    @property
    def serves_tls(self) -> bool:
        return self.cert_file is not None

    def describe(self) -> str:
        """For the start-up log line."""
        if not self.serves_tls:
            return "plaintext"
        return "TLS, client certificates " + ("required (mTLS)" if self.require_client_cert else "not required")

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """None = plaintext. With ``require_client_cert``, a client without a certificate the CA
        signed fails the handshake and never reaches a handler."""
        if not self.serves_tls:
            return None
        pair = (self.key_file.read_bytes(), self.cert_file.read_bytes())
        if not self.require_client_cert:
            return grpc.ssl_server_credentials([pair])
        return grpc.ssl_server_credentials([pair], root_certificates=self.ca_file.read_bytes(),
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """How this process calls the mesh: None (plaintext) without a CA; else it verifies the
        server against the CA and presents its own certificate when it has one."""
        if self.ca_file is None:
            return None
        if not self.serves_tls:
            return grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())
        return grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes(),
                                            private_key=self.key_file.read_bytes(),
                                            certificate_chain=self.cert_file.read_bytes())


def probe_credentials(folder: Path | None) -> grpc.ChannelCredentials | None:
    """What a health check presents to a mesh whose certificates are in ``folder`` (None = plaintext)."""
    return TlsConfig.from_dir(folder, PROBE).channel_credentials() if folder else None
