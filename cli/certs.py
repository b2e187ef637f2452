"""`nlpmesh certs init`: a development CA and one certificate per service, in one folder.

The folder's layout is the one ``NLPMESH_TLS_DIR`` names (meshkit/tls.py): ``ca.crt``,
and ``<name>.crt`` / ``<name>.key`` for each service, for ``redis`` (the server
certificate of compose's and Kubernetes' Redis, which serves TLS only) and for
``probe``, the health checks' client certificate. The CA's key (``ca.key``) stays beside them so that a
second ``init`` can issue what is missing; a production mesh would keep it elsewhere.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshkit.settings import DEFAULT_PORTS
from meshkit.tls import CA_FILE, PROBE

SERVICES = tuple(DEFAULT_PORTS)  # gateway, template, tokenizer, cache, inference, edge
REDIS = "redis"  # a server only: the services authenticate to it with their ACL users' passwords
DEFAULT_NAMESPACE = "nlpmesh"
CA_DAYS = 3650
LEAF_DAYS = 825


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate and the key that signs with it."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass
class InitReport:
    directory: Path
    made: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def dns_names(service: str, namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """The names a service is reached by: compose, Kubernetes (short, namespaced, FQDN), this host."""
    return [service, f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local", "localhost"]


def make_authority(common_name: str = "nlpmesh development CA", days: int = CA_DAYS) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def issue(authority: Authority, common_name: str, dns: list[str] = (), ips: list[str] = (),
          server: bool = True, client: bool = True,
          days: int = LEAF_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by ``authority``, for server and/or client authentication."""
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [oid for oid, wanted in ((ExtendedKeyUsageOID.SERVER_AUTH, server),
                                      (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if wanted]
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(authority.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
                       critical=False)
    )
    names = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(authority.key, hashes.SHA256()), key


def write_pair(directory: Path, name: str, cert: x509.Certificate, key) -> None:
    """``<name>.crt`` (0644) and ``<name>.key`` (0600, never readable by others, even for a moment)."""
    _write(directory / f"{name}.key", key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()), 0o600)
    _write(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_authority(directory: Path) -> Authority:
    cert = x509.load_pem_x509_certificate((directory / CA_FILE).read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    return Authority(cert, key)


def init_certs(directory: Path, namespace: str = DEFAULT_NAMESPACE, force: bool = False) -> InitReport:
    """Makes the CA and every certificate missing from ``directory``; keeps the rest unless ``force``.

    Every service certificate serves and is a client (the gateway calls the others
    with its own); ``probe`` is a client only.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    report = InitReport(directory)
    names = [*SERVICES, REDIS, PROBE]
    if force:
        for name in ("ca", *names):
            for suffix in (".crt", ".key"):
                (directory / f"{name}{suffix}").unlink(missing_ok=True)
    have_ca = [(directory / f"ca{s}").exists() for s in (".crt", ".key")]
    if any(have_ca) and not all(have_ca):
        raise FileExistsError(f"{directory} holds only half of the CA (ca.crt, ca.key); rerun with --force")
    if all(have_ca):
        authority = load_authority(directory)
        report.kept.append("ca")
    else:
        stale = [n for n in names if (directory / f"{n}.crt").exists()]
        if stale:
            raise FileExistsError(f"{directory} has certificates ({', '.join(stale)}) but no CA; rerun with --force")
        authority = make_authority()
        write_pair(directory, "ca", authority.cert, authority.key)
        report.made.append("ca")
    for name in names:
        if (directory / f"{name}.crt").exists() and (directory / f"{name}.key").exists():
            report.kept.append(name)
            continue
        _issue_leaf(directory, authority, name, namespace)
        report.made.append(name)
    return report


def rotate_certs(directory: Path, namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """New certificates and keys for every service, Redis and the probe, from the same CA; returns their names.

    Each pair is written key first, each file atomically: a running server that reads the pair between the
    two sees a key that is not its certificate's and keeps serving the old pair until both are new
    (meshkit.tls.CertificateReloader). The CA stays: every client keeps trusting the new certificates.
    """
    directory = Path(directory)
    if not ((directory / CA_FILE).exists() and (directory / "ca.key").exists()):
        raise FileNotFoundError(f"{directory} has no CA (ca.crt, ca.key): run `nlpmesh certs init` first")
    authority = load_authority(directory)
    names = [*SERVICES, REDIS, PROBE]
    for name in names:
        _issue_leaf(directory, authority, name, namespace)
    return names


def _issue_leaf(directory: Path, authority: Authority, name: str, namespace: str) -> None:
    if name == PROBE:
        cert, key = issue(authority, name, [name], server=False, client=True)  # strict verifiers want a SAN
    elif name == REDIS:
        cert, key = issue(authority, name, dns_names(name, namespace), ["127.0.0.1", "::1"], client=False)
    else:
        cert, key = issue(authority, name, dns_names(name, namespace), ["127.0.0.1", "::1"])
    write_pair(directory, name, cert, key)


def _write(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(temporary, mode)  # the umask may have narrowed a certificate's mode
    temporary.replace(path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
