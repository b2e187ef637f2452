"""`nlpmesh certs init`: a CA and per-service certificates that verify, with the mesh's names, keys 0600."""
from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.verification import ClientVerifier, PolicyBuilder, ServerVerifier, Store, VerificationError

from cli.certs import REDIS, SERVICES, init_certs, load_authority, make_authority, write_pair
from cli.main import main


def _cert(folder, name) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / f"{name}.crt").read_bytes())


def _server_verifier(folder, name: str) -> ServerVerifier:
    store = Store([_cert(folder, "ca")])
    subject = x509.IPAddress(ipaddress.ip_address(name)) if name[0].isdigit() else x509.DNSName(name)
    return PolicyBuilder().store(store).build_server_verifier(subject)


def _client_verifier(folder) -> ClientVerifier:
    return PolicyBuilder().store(Store([_cert(folder, "ca")])).build_client_verifier()


def test_every_service_certificate_serves_under_its_compose_kubernetes_and_local_names(tmp_path):
    init_certs(tmp_path, namespace="prod")
    for service in (*SERVICES, REDIS):
        cert = _cert(tmp_path, service)
        for name in (service, f"{service}.prod.svc", f"{service}.prod.svc.cluster.local", "localhost", "127.0.0.1"):
            _server_verifier(tmp_path, name).verify(cert, [])  # chain, SAN and serverAuth; raises if not
        with pytest.raises(VerificationError):
            _server_verifier(tmp_path, "gateway" if service != "gateway" else "inference").verify(cert, [])


def test_the_default_namespace_is_nlpmesh(tmp_path):
    init_certs(tmp_path)
    names = _cert(tmp_path, "inference").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "inference.nlpmesh.svc.cluster.local" in names.get_values_for_type(x509.DNSName)


def test_service_and_probe_certificates_are_clients_of_the_mesh_and_the_probe_serves_nothing(tmp_path):
    init_certs(tmp_path)
    for name in (*SERVICES, "probe"):
        _client_verifier(tmp_path).verify(_cert(tmp_path, name), [])
    with pytest.raises(VerificationError):
        _server_verifier(tmp_path, "localhost").verify(_cert(tmp_path, "probe"), [])
    with pytest.raises(VerificationError):  # Redis's serves only: the services authenticate to it with passwords
        _client_verifier(tmp_path).verify(_cert(tmp_path, REDIS), [])


def test_a_certificate_from_another_ca_does_not_verify(tmp_path):
    init_certs(tmp_path / "mesh")
    init_certs(tmp_path / "other")
    with pytest.raises(VerificationError):
        _client_verifier(tmp_path / "mesh").verify(_cert(tmp_path / "other", "gateway"), [])


def test_keys_are_readable_by_the_owner_only(tmp_path):
    init_certs(tmp_path / "certs")
    keys = sorted((tmp_path / "certs").glob("*.key"))
    assert len(keys) == len(SERVICES) + 3  # and ca.key, redis.key, probe.key
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key.name
    assert stat.S_IMODE((tmp_path / "certs").stat().st_mode) == 0o700


def test_a_second_init_keeps_everything_and_force_replaces_it(tmp_path):
    first = init_certs(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = init_certs(tmp_path)
    assert again.made == [] and set(again.kept) == set(first.made)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    forced = init_certs(tmp_path, force=True)
    assert set(forced.made) == set(first.made)
    assert all(before[p.name] != p.read_bytes() for p in tmp_path.iterdir())


def test_a_missing_certificate_is_issued_by_the_existing_ca(tmp_path):
    init_certs(tmp_path)
    ca = (tmp_path / "ca.crt").read_bytes()
    (tmp_path / "cache.crt").unlink()
    report = init_certs(tmp_path)
    assert report.made == ["cache"]
    assert (tmp_path / "ca.crt").read_bytes() == ca
    _server_verifier(tmp_path, "cache").verify(_cert(tmp_path, "cache"), [])


def test_certificates_without_their_ca_are_refused_unless_forced(tmp_path):
    init_certs(tmp_path)
    (tmp_path / "ca.crt").unlink()
    (tmp_path / "ca.key").unlink()
    with pytest.raises(FileExistsError):
        init_certs(tmp_path)
    init_certs(tmp_path, force=True)
    _client_verifier(tmp_path).verify(_cert(tmp_path, "gateway"), [])


def test_a_written_authority_loads_back(tmp_path):
    authority = make_authority("test CA")
    write_pair(tmp_path, "ca", authority.cert, authority.key)
    assert load_authority(tmp_path).cert == authority.cert


def test_the_cli_makes_them_where_asked_and_is_idempotent(tmp_path, capsys):
    assert main(["certs", "init", "--dir", str(tmp_path / "c")]) == 0
    assert main(["certs", "init", "--dir", str(tmp_path / "c")]) == 0
    assert "made none" in capsys.readouterr().out
