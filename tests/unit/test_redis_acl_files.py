"""`nlpmesh redis-acl`: the rendered users.acl and redis.env, and which passwords it keeps."""
import hashlib
import stat

import pytest

from cli.main import main
from cli.redis_acl import RedisUsers, generate, read_passwords


def test_the_rendered_file_holds_each_password_as_its_sha256_and_no_comment(tmp_path):
    assert main(["redis-acl", "--out", str(tmp_path)]) == 0
    passwords = read_passwords(tmp_path / "redis.env")
    acl = (tmp_path / "users.acl").read_text()
    assert set(passwords) == {"gateway", "cache", "inference", "admin"}
    for user, password in passwords.items():
        assert f"user {user} reset on #{hashlib.sha256(password.encode()).hexdigest()} " in acl
        assert password not in acl
    assert all(line.startswith("user ") for line in acl.splitlines())
    assert stat.S_IMODE((tmp_path / "redis.env").stat().st_mode) == 0o600
    env = (tmp_path / "redis.env").read_text()
    assert f"NLPMESH_GATEWAY_REDIS_URL=redis://gateway:{passwords['gateway']}@redis:6379/0" in env


def test_passwords_are_kept_unless_rotated_and_the_environment_wins(tmp_path, monkeypatch):
    generate(tmp_path)
    first = read_passwords(tmp_path / "redis.env")
    generate(tmp_path)
    assert read_passwords(tmp_path / "redis.env") == first
    monkeypatch.setenv("NLPMESH_REDIS_CACHE_PASSWORD", "chosen-by-the-operator-0123")
    generate(tmp_path, rotate=True)
    rotated = read_passwords(tmp_path / "redis.env")
    assert rotated["cache"] == "chosen-by-the-operator-0123"
    assert all(rotated[user] != first[user] for user in ("gateway", "inference", "admin"))


@pytest.mark.parametrize("password", ["short", "has space in it 0123456", "dollar$sign0123456789", "at@sign0123456789"])
def test_a_password_unsafe_in_a_url_or_env_file_is_refused(password):
    with pytest.raises(ValueError, match="NLPMESH_REDIS_GATEWAY_PASSWORD"):
        RedisUsers.make({"gateway": password})
