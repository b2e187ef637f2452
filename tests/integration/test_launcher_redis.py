"""`nlpmesh up`'s private redis-server runs with deploy/redis/users.acl: each service gets its own user."""
import stat
from urllib.parse import urlsplit

import pytest
import redis

from cli.launcher import LocalMesh
from cli.topology import load_topology, local_environment
from meshkit.settings import DEFAULT_PORTS


@pytest.fixture
def private_redis_mesh(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    mesh = LocalMesh(tmp_path, free_ports=True, services=[], progress=lambda line: None)
    mesh.start(ready_timeout_s=5)
    yield mesh
    mesh.stop()


def test_each_redis_using_service_gets_its_own_user(private_redis_mesh):
    urls = private_redis_mesh.redis_urls
    assert {name: urlsplit(url).username for name, url in urls.items()} == {
        "gateway": "gateway", "cache": "cache", "inference": "inference"}
    for service in load_topology():
        env = local_environment(service, dict(DEFAULT_PORTS), private_redis_mesh.redis_url_for(service.name))
        assert env.get("REDIS_URL", "") == urls.get(service.name, ""), service.name


def test_the_private_users_are_limited_and_the_default_user_is_off(private_redis_mesh):
    with redis.Redis.from_url(private_redis_mesh.redis_url_for("inference")) as inference:
        inference.set("nlpmesh:kv:probe", b"block", ex=60)
        assert inference.mget(["nlpmesh:kv:probe"]) == [b"block"]
        with pytest.raises(redis.ResponseError, match="no permissions"):
            inference.get("nlpmesh:pc:stats")
    with redis.Redis.from_url(private_redis_mesh.redis_url_for("gateway")) as gateway, \
            pytest.raises(redis.ResponseError, match="no permissions"):
        gateway.flushall()
    anonymous_url = private_redis_mesh.resolved_redis_url.split("@")[-1]
    with redis.Redis.from_url(f"redis://{anonymous_url}") as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()


def test_the_acl_file_holds_hashes_and_only_the_env_file_holds_passwords(private_redis_mesh):
    folder = private_redis_mesh.run_dir / "redis"
    password = urlsplit(private_redis_mesh.redis_url_for("cache")).password
    assert password not in (folder / "users.acl").read_text()
    assert password in (folder / "redis.env").read_text()
    assert stat.S_IMODE((folder / "redis.env").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_given_redis_url_is_every_services_url(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    mesh = LocalMesh(tmp_path, free_ports=True, services=[], progress=lambda line: None)
    mesh.start(ready_timeout_s=5)
    assert set(mesh.redis_urls.values()) == {"redis://127.0.0.1:1/0"} == {mesh.resolved_redis_url}
    mesh.stop()
