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
process rather than leaving it in plaintext. A server then reloads its certificate, key and CA
when the files change (``CertificateReloader``, behind grpc's dynamic server credentials):
each new connection's handshake checks them, and connections already open keep theirs. A
pair that does not match (a certificate written before its key) is not served: the previous
one stays until the files agree.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import Gauge

log = logging.getLogger("nlpmesh.tls")

CERTIFICATE_NOT_AFTER = Gauge(
    "nlpmesh_certificate_not_after_seconds",
    "When the certificate this server presents stops being valid (Unix seconds), set at start and at each reload.",
    ["service"],
)

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

    def server_credentials(self, on_reload: Callable[[], None] | None = None) -> grpc.ServerCredentials | None:
        """None = plaintext. With ``require_client_cert``, a client without a certificate the CA
        signed fails the handshake and never reaches a handler. The files are read again when they
        change (``CertificateReloader``; ``on_reload`` runs after each reload)."""
        if not self.serves_tls:
            return None
        reloader = CertificateReloader(self, on_reload)
        return grpc.dynamic_ssl_server_credentials(reloader.initial(), reloader,
                                                   require_client_authentication=self.require_client_cert)

    def files_digest(self) -> str:
        """A digest of the files this configuration names (an unreadable one counts as empty): a client
        compares it to know when to build its credentials again."""
        contents = []
        for path in (self.cert_file, self.key_file, self.ca_file):
            try:
                contents.append(path.read_bytes() if path is not None else b"")
            except OSError:
                contents.append(b"")
        return _digest(contents)

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


class CertificateReloader:
    """grpc's certificate configuration fetcher for one server: called at each new connection's handshake, it
    gives a new configuration when the certificate, key or CA files changed, else None (keep the current one).
    """

    def __init__(self, config: TlsConfig, on_reload: Callable[[], None] | None = None):
        self._config = config
        self._on_reload = on_reload
        self._files = [path for path in (config.cert_file, config.key_file, config.ca_file) if path is not None]
        self._seen = ""
        self._refused = ""  # the contents last refused: warned about once

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The configuration at start: unreadable or mismatched files stop the process."""
        contents = self._read()
        self._seen = _digest(contents)
        return self._configuration(contents)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            contents = self._read()
        except OSError:  # a file being replaced: the next handshake looks again
            return None
        digest = _digest(contents)
        if digest == self._seen:
            return None
        try:
            configuration = self._configuration(contents)
        except ValueError as error:
            if digest != self._refused:
                self._refused = digest
                log.warning("TLS files changed but are not served, the previous certificate stays: %s", error)
            return None
        self._seen = digest
        log.info("TLS certificate reloaded from %s (serial %x)", self._config.cert_file,
                 x509.load_pem_x509_certificate(contents[0]).serial_number)
        if self._on_reload is not None:
            self._on_reload()
        return configuration

    def _read(self) -> list[bytes]:
        return [path.read_bytes() for path in self._files]

    def _configuration(self, contents: list[bytes]) -> grpc.ServerCertificateConfiguration:
        certificate, key = contents[0], contents[1]
        _check_pair(certificate, key)
        roots = contents[2] if self._config.require_client_cert else None
        return grpc.ssl_server_certificate_configuration([(key, certificate)], root_certificates=roots)


def _digest(contents: list[bytes]) -> str:
    return hashlib.sha256(b"\0".join(contents)).hexdigest()


def _check_pair(certificate_pem: bytes, key_pem: bytes) -> None:
    """ValueError unless the key is the certificate's (its text is never part of the message)."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"a certificate or key does not parse ({type(error).__name__})") from None
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
        raise ValueError("the key is not the certificate's")


def export_certificate_expiry(config: TlsConfig, service: str) -> None:
    """Sets ``nlpmesh_certificate_not_after_seconds{service}`` from the certificate file (nothing in plaintext)."""
    if config.cert_file is None:
        return
    certificate = x509.load_pem_x509_certificate(config.cert_file.read_bytes())
    CERTIFICATE_NOT_AFTER.labels(service).set(certificate.not_valid_after_utc.timestamp())


def probe_credentials(folder: Path | None) -> grpc.ChannelCredentials | None:
    """What a health check presents to a mesh whose certificates are in ``folder`` (None = plaintext)."""
    return TlsConfig.from_dir(folder, PROBE).channel_credentials() if folder else None
