"""meshkit/redis_connect.py: the one builder of Redis clients, its URL check and redaction."""
import pytest
import redis
import redis.asyncio as aioredis

from meshkit.redis_connect import RedisUrlError, check_redis_url, redact_url, redis_from_url
from promptcache.redis_tier import redis_client


def test_a_url_with_user_and_password_gives_a_client_that_authenticates_as_that_user():
    client = redis_from_url(redis.Redis, "redis://gateway:s3cret%2Fx@redis:6379/0", socket_timeout=1.0)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["host"], kwargs["port"]) == ("gateway", "s3cret/x", "redis", 6379)
    assert kwargs["driver_info"] is None  # no CLIENT SETINFO: nothing the ACL user is not granted


def test_rediss_carries_the_ca_and_client_certificate_files_and_verifies(tmp_path):
    for name in ("ca.pem", "me.pem", "me.key"):
        (tmp_path / name).write_text("-")
    url = f"rediss://cache:pw@redis:6380/0?ssl_ca_certs={tmp_path}/ca.pem&ssl_certfile={tmp_path}/me.pem&ssl_keyfile={tmp_path}/me.key"
    pool = redis_client(url).connection_pool
    kwargs = pool.connection_kwargs
    assert pool.connection_class is aioredis.SSLConnection
    assert kwargs["ssl_ca_certs"] == f"{tmp_path}/ca.pem"
    assert (kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (f"{tmp_path}/me.pem", f"{tmp_path}/me.key")
    assert "ssl_cert_reqs" not in kwargs and "ssl_check_hostname" not in kwargs  # redis-py's defaults: required, True


@pytest.mark.parametrize("url, complaint", [
    ("http://redis:6379/0", "not a redis"),
    ("redis:///0", "not a redis"),
    ("rediss://u:pw@redis:6380/0?ssl_cert_reqs=none", "unsupported option"),
    ("rediss://u:pw@redis:6380/0?ssl_ca_cert=/etc/ca.pem", "unsupported option"),
    ("redis://u:pw@redis:6379/0?ssl_ca_certs=/etc/hostname", "plaintext"),
    ("rediss://u:pw@redis:6380/0?ssl_ca_certs=/no/such/ca.pem", "no such file"),
    ("rediss://u:pw@redis:6380/0?ssl_certfile=/etc/hostname", "both"),
])
def test_a_url_the_mesh_would_fail_on_later_is_refused_at_start_without_its_password(url, complaint):
    with pytest.raises(RedisUrlError, match=complaint) as raised:
        check_redis_url(url)
    assert "pw@" not in str(raised.value)


def test_the_inference_client_is_built_by_the_same_check():
    from services.inference.prefix import RedisBlocks

    with pytest.raises(RedisUrlError):
        RedisBlocks("redis://inference:pw@redis:6379/0?ssl_ca_certs=/etc/hostname")


@pytest.mark.parametrize("text, shown", [
    ("redis://gateway:s3cret@redis:6379/0", "redis://gateway:***@redis:6379/0"),
    ("rediss://:s3cret@redis:6380/0", "rediss://:***@redis:6380/0"),
    ("redis://s3cret@redis:6379/0", "redis://***@redis:6379/0"),
    ("redis://u:pa/ss@h:1/0", "redis://u:***@h:1/0"),
    ("Error connecting to redis://u:s3cret@h:1/0. refused", "Error connecting to redis://u:***@h:1/0. refused"),
    ("redis://redis:6379/0", "redis://redis:6379/0"),
])
def test_redaction_hides_every_password(text, shown):
    assert redact_url(text) == shown
