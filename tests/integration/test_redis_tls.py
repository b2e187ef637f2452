"""rediss:// against a real redis-server serving TLS (and the ACL users): the prompt cache stores and
looks up over it; plaintext, a client without its certificate, or one trusting another CA get nowhere."""
import asyncio
import datetime
import ipaddress
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import redis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cli.certs import init_certs
from cli.redis_acl import RedisUsers, password_env, read_passwords, write
from cli.topology import COMPOSE_FILE, compose_redis_server_args
from meshkit.redis_connect import redis_from_url
from meshkit.sampling import Sampling
from promptcache.keys import PromptCacheKey, TemplatePrompt
from promptcache.redis_tier import CachedAnswer, PromptCache, redis_client
from tests.conftest import free_port, running_redis_server
from tests.polling import wait_until

ANSWER = CachedAnswer(text="Paris.", finish_reason=1, prompt_tokens=12, completion_tokens=2, model="m1")


def _certificate(name: str, key, issuer_name: x509.Name, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """A CA (``ca.pem``) and, for each name, ``<name>.pem`` and ``<name>.key`` signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_common_name = f"test CA {folder.name}"
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_common_name)])
    paths = {"ca": folder / "ca.pem"}
    paths["ca"].write_bytes(_certificate(ca_common_name, ca_key, ca_name, ca_key, True)
                            .public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        paths[name] = folder / f"{name}.pem"
        paths[f"{name}.key"] = folder / f"{name}.key"
        paths[name].write_bytes(_certificate(name, key, ca_name, ca_key, False).public_bytes(serialization.Encoding.PEM))
        paths[f"{name}.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    folder = tmp_path_factory.mktemp("redis-tls")
    pki = make_pki(folder / "pki", ("server", "client"))
    users = RedisUsers.make()
    acl_file, _ = write(folder, users, "127.0.0.1", 0)
    tls_port = free_port()
    with running_redis_server("--aclfile", str(acl_file), "--tls-port", str(tls_port),
                              "--tls-cert-file", str(pki["server"]), "--tls-key-file", str(pki["server.key"]),
                              "--tls-ca-cert-file", str(pki["ca"]), "--tls-auth-clients", "yes"):
        def url(user: str, client_cert: bool = True, ca: Path = pki["ca"]) -> str:
            query = f"?ssl_ca_certs={ca}"
            if client_cert:
                query += f"&ssl_certfile={pki['client']}&ssl_keyfile={pki['client.key']}"
            return users.url(user, "127.0.0.1", tls_port, scheme="rediss") + query
        yield url


def key(tenant: str) -> PromptCacheKey:
    return PromptCacheKey(tenant, "m1", "r1", TemplatePrompt("capital", "1", {"country": "France"}),
                          Sampling(max_new_tokens=8))


def test_the_prompt_cache_stores_and_looks_up_over_rediss(tls_redis):
    tenant = uuid.uuid4().hex

    async def main():
        cache = PromptCache(redis_client(tls_redis("cache")), "nlpmesh:pc", ttl_s=60, timeout_s=2.0)
        gateway = PromptCache(redis_client(tls_redis("gateway")), "nlpmesh:pc", ttl_s=60, timeout_s=2.0)
        assert await cache.store(key(tenant), ANSWER)
        assert await gateway.lookup(key(tenant)) == ANSWER
        await cache.close()
        await gateway.close()

    asyncio.run(main())


def test_plaintext_to_the_tls_port_gets_nowhere(tls_redis):
    plaintext = tls_redis("cache", client_cert=False).replace("rediss://", "redis://").split("?")[0]
    with redis.Redis.from_url(plaintext, socket_timeout=2, socket_connect_timeout=2) as client, \
            pytest.raises(redis.ConnectionError):
        client.ping()


def test_a_client_without_its_certificate_is_refused(tls_redis):
    with redis.Redis.from_url(tls_redis("cache", client_cert=False), socket_timeout=2) as client, \
            pytest.raises(redis.ConnectionError):
        client.ping()


def test_a_server_certificate_from_another_ca_is_refused(tls_redis, tmp_path):
    other_ca = make_pki(tmp_path / "other", ())["ca"]
    with redis.Redis.from_url(tls_redis("cache", ca=other_ca), socket_timeout=2) as client, \
            pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed"):
        client.ping()


def _compose_value(text: str, passwords: dict[str, str], replacements: dict[str, str]) -> str:
    """A compose string as compose would run it here: ``${VAR:?..}`` from ``passwords``, ``${VAR:-d}`` as d, then
    the container's paths and addresses replaced by this test's."""
    text = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: passwords[m[1]], text)
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)
    for container_path, here in replacements.items():
        text = text.replace(container_path, here)
    return text


def test_composes_redis_serves_only_tls_and_each_services_url_reaches_it_with_the_mesh_ca(tmp_path):
    """docker-compose.yml's redis-server command line (the Kubernetes base runs the same one), run for real with
    the certificates of `nlpmesh certs init` and the users of `nlpmesh redis-acl`: every service's compose
    REDIS_URL connects over TLS verified with the mesh CA, the healthcheck's line answers, and plaintext or a
    client trusting another CA gets nowhere."""
    certs = tmp_path / "certs"
    init_certs(certs)
    acl_file, env_file = write(tmp_path, RedisUsers.make(), "redis", 6379)
    passwords = {password_env(user): password for user, password in read_passwords(env_file).items()}
    port = free_port()
    replacements = {"/etc/nlpmesh/certs/": f"{certs}/", "/run/redis-tls/": f"{certs}/",
                    "/etc/redis/users.acl": str(acl_file), "@redis:6379/": f"@127.0.0.1:{port}/"}
    args = [_compose_value(arg, passwords, replacements) for arg in compose_redis_server_args()]
    assert args[args.index("--port") + 1] == "0"  # no plaintext port at all
    args[args.index("--tls-port") + 1] = str(port)
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    process = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", *args[1:],
                                "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        health = _compose_value(compose["redis"]["healthcheck"]["test"][1], passwords, replacements)
        health = health.replace("redis-cli ", f"redis-cli -p {port} ", 1)
        wait_until(lambda: subprocess.run(["sh", "-c", health], timeout=5).returncode == 0, 10, 0.1,
                   what="compose's healthcheck to pass")
        urls = {name: _compose_value(spec["environment"]["REDIS_URL"], passwords, replacements)
                for name, spec in compose.items() if "REDIS_URL" in spec.get("environment", {})}
        assert {"gateway", "cache"} <= set(urls) and any(name.startswith("inference") for name in urls)
        for name, url in urls.items():
            assert url.startswith("rediss://"), name
            with redis_from_url(redis.Redis, url, socket_timeout=2) as client:
                assert client.ping(), name
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2) as plain, \
                pytest.raises(redis.ConnectionError):
            plain.ping()
        other = tmp_path / "other"
        init_certs(other)
        stranger = urls["cache"].replace(f"{certs}/ca.crt", f"{other}/ca.crt")
        with redis_from_url(redis.Redis, stranger, socket_timeout=2) as client, pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        process.kill()
        process.wait()
