"""Certificates reloaded without a restart: the fetcher gRPC calls at each handshake gives a new configuration
once the files changed, none while they did not, and never a pair whose key is not its certificate's;
`nlpmesh certs rotate` makes new leaves from the same CA, keys first."""
import logging
import stat

import pytest
from cryptography import x509

from cli.certs import init_certs, issue, load_authority, rotate_certs, write_pair
from meshkit.tls import CertificateReloader, TlsConfig


def serial(folder, name: str) -> int:
    return x509.load_pem_x509_certificate((folder / f"{name}.crt").read_bytes()).serial_number


@pytest.fixture
def certs(tmp_path):
    init_certs(tmp_path)
    return tmp_path


def test_unchanged_files_keep_the_configuration_and_rotated_ones_replace_it_once(certs):
    reloads = []
    reloader = CertificateReloader(TlsConfig.from_dir(certs, "template", require_client_cert=True),
                                   on_reload=lambda: reloads.append(1))
    assert reloader.initial() is not None
    assert reloader() is None
    before = serial(certs, "template")
    assert "template" in rotate_certs(certs)
    assert serial(certs, "template") != before
    assert reloader() is not None and reloads == [1]
    assert reloader() is None and reloads == [1]


def test_a_certificate_written_without_its_key_is_not_served_until_the_key_follows(certs, caplog):
    reloader = CertificateReloader(TlsConfig.from_dir(certs, "gateway"))
    reloader.initial()
    cert, key = issue(load_authority(certs), "gateway", ["gateway"], ["127.0.0.1"])
    scratch = certs / "scratch"
    scratch.mkdir()
    write_pair(scratch, "gateway", cert, key)
    (certs / "gateway.crt").write_bytes((scratch / "gateway.crt").read_bytes())  # the certificate alone
    with caplog.at_level(logging.WARNING, logger="nlpmesh.tls"):
        assert reloader() is None
        assert reloader() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not the certificate's" in warnings[0]  # once, however many handshakes
    assert "BEGIN" not in warnings[0]  # no key or certificate text
    (certs / "gateway.key").write_bytes((scratch / "gateway.key").read_bytes())
    assert reloader() is not None


def test_rotate_keeps_the_ca_writes_keys_private_and_needs_a_ca(certs, tmp_path_factory):
    ca = (certs / "ca.crt").read_bytes()
    rotate_certs(certs)
    assert (certs / "ca.crt").read_bytes() == ca
    assert stat.S_IMODE((certs / "inference.key").stat().st_mode) == 0o600
    with pytest.raises(FileNotFoundError, match="nlpmesh certs init"):
        rotate_certs(tmp_path_factory.mktemp("empty"))


def test_the_expiry_gauge_follows_the_certificate_a_reload_serves(certs):
    from meshkit.tls import CERTIFICATE_NOT_AFTER, export_certificate_expiry

    config = TlsConfig.from_dir(certs, "cache", require_client_cert=True)
    reloader = CertificateReloader(config, on_reload=lambda: export_certificate_expiry(config, "cache"))
    reloader.initial()
    export_certificate_expiry(config, "cache")

    def not_after() -> float:
        return x509.load_pem_x509_certificate((certs / "cache.crt").read_bytes()).not_valid_after_utc.timestamp()
    assert CERTIFICATE_NOT_AFTER.labels("cache")._value.get() == not_after()
    CERTIFICATE_NOT_AFTER.labels("cache").set(0)  # what a reload must overwrite
    rotate_certs(certs)
    assert reloader() is not None
    assert CERTIFICATE_NOT_AFTER.labels("cache")._value.get() == not_after()
