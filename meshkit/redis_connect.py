"""How every nlpmesh process connects to Redis: from one URL per service, checked at start.

A service's URL (``REDIS_URL`` or ``NLPMESH_<SERVICE>_REDIS_URL``) is its whole
Redis configuration, for the sync client (inference) and the asyncio one
(gateway, cache) alike:

    redis://USER:PASSWORD@HOST:PORT/0
    rediss://USER:PASSWORD@HOST:PORT/0?ssl_ca_certs=/ca.pem
    rediss://USER:PASSWORD@HOST:PORT/0?ssl_ca_certs=/ca.pem&ssl_certfile=/me.pem&ssl_keyfile=/me.key

The user and password are percent-encoded. ``rediss`` always verifies the
server's certificate (against ``ssl_ca_certs``, else the system's CAs) and its
host name: the URL cannot turn verification off. A client certificate is
optional (for a server with ``tls-auth-clients yes``).

A Redis Cluster is named by the scheme: ``redis+cluster://`` (or
``rediss+cluster://`` for TLS) with the same user, password and TLS options,
and the host and port of any one node (a seed: the client learns the others
from CLUSTER SLOTS, and follows MOVED/ASK itself). Such a URL gets redis-py's
cluster client (``redis.cluster.RedisCluster`` / ``redis.asyncio.cluster.RedisCluster``)
instead; a cluster has only database 0:

    redis+cluster://USER:PASSWORD@10.0.0.5:7000/0
    rediss+cluster://USER:PASSWORD@redis-0.redis:6379/0?ssl_ca_certs=/ca.pem

Callers that touch several keys in one operation must give them one hash tag
(``{...}``), or the cluster answers CROSSSLOT: see promptcache/redis_tier.py and
services/inference/prefix.py for the layouts.

The check runs when a client is built, at start: a mistyped option or a missing
certificate file stops the process instead of making every cache lookup a
quiet miss.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

SCHEMES = ("redis", "rediss")
CLUSTER_SUFFIX = "+cluster"
CLUSTER_SCHEMES = tuple(scheme + CLUSTER_SUFFIX for scheme in SCHEMES)
# The cluster client that stands in for each single-node client class.
_CLUSTER_CLASSES: dict[type, type] = {
    redis.Redis: redis.cluster.RedisCluster,
    redis.asyncio.Redis: redis.asyncio.cluster.RedisCluster,
}
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
# A URL's userinfo, also inside a longer text such as an error message.
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*)(?P<password>:[^@\s]*)?@")


C = TypeVar("C")  # redis.Redis or redis.asyncio.Redis


class RedisUrlError(ValueError):
    """A Redis URL this mesh will not connect with; the message never holds the password."""


def redis_from_url(client_class: type[C], url: str, **options) -> C | Any:
    """A ``redis.Redis`` or ``redis.asyncio.Redis`` for ``url``, after ``check_redis_url``;
    for a ``redis+cluster://`` URL the matching ``RedisCluster`` (sync or asyncio).

    ``driver_info=None``: no CLIENT SETINFO on connect, so a connection sends
    only what the service's ACL user is granted (deploy/redis/users.acl).
    """
    check_redis_url(url)
    if is_cluster_url(url):
        cluster_class = _CLUSTER_CLASSES.get(client_class)
        if cluster_class is None:
            raise RedisUrlError(f"no cluster client for {client_class.__name__}")
        scheme, rest = url.split("://", 1)
        return cluster_class.from_url(f"{scheme.removesuffix(CLUSTER_SUFFIX)}://{rest}", driver_info=None, **options)
    return client_class.from_url(url, driver_info=None, **options)


def is_cluster_url(url: str) -> bool:
    """True for a ``redis+cluster://`` or ``rediss+cluster://`` URL."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def is_cluster_client(client: object) -> bool:
    """True for redis-py's cluster clients (sync or asyncio)."""
    return isinstance(client, tuple(_CLUSTER_CLASSES.values()))


def check_redis_url(url: str) -> None:
    """Raises RedisUrlError unless ``url`` is a redis[s]:// or redis[s]+cluster:// URL this mesh supports."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES + CLUSTER_SCHEMES or not parts.hostname:
        raise RedisUrlError(f"not a redis://, rediss://, redis+cluster:// or rediss+cluster:// URL with a host: "
                            f"{redact_url(url)!r}")
    tls = parts.scheme.startswith("rediss")
    if parts.scheme in CLUSTER_SCHEMES and parts.path.strip("/") not in ("", "0"):
        raise RedisUrlError(f"a Redis Cluster has only database 0: {redact_url(url)!r}")
    options = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(options) - set(_TLS_FILES))
    if unknown:
        raise RedisUrlError(f"unsupported option(s) {', '.join(unknown)} in {redact_url(url)!r}; "
                            f"a URL may name only {', '.join(_TLS_FILES)} (with rediss://)")
    if options and not tls:
        raise RedisUrlError(f"TLS options on a plaintext URL (use rediss://): {redact_url(url)!r}")
    if ("ssl_certfile" in options) != ("ssl_keyfile" in options):
        raise RedisUrlError("a client certificate needs both ssl_certfile and ssl_keyfile")
    for name, values in options.items():
        if len(values) != 1 or not Path(values[0]).is_file():
            raise RedisUrlError(f"{name}: no such file {values[-1]!r}")


def redact_url(text: str) -> str:
    """``text`` with every URL's password (or lone userinfo) replaced, fit for a log line."""
    def hide(match: re.Match) -> str:
        if match["password"] is None:
            return f"{match['scheme']}***@"
        return f"{match['scheme']}{match['user']}:***@"
    return _USERINFO.sub(hide, text)
