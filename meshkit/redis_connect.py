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

The check runs when a client is built, at start: a mistyped option or a missing
certificate file stops the process instead of making every cache lookup a
quiet miss.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

SCHEMES = ("redis", "rediss")
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
# A URL's userinfo, also inside a longer text such as an error message.
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*)(?P<password>:[^@\s]*)?@")


C = TypeVar("C")  # redis.Redis or redis.asyncio.Redis


class RedisUrlError(ValueError):
    """A Redis URL this mesh will not connect with; the message never holds the password."""


def redis_from_url(client_class: type[C], url: str, **options) -> C:
    """A ``redis.Redis`` or ``redis.asyncio.Redis`` for ``url``, after ``check_redis_url``.

    ``driver_info=None``: no CLIENT SETINFO on connect, so a connection sends
    only what the service's ACL user is granted (deploy/redis/users.acl).
    """
    check_redis_url(url)
    return client_class.from_url(url, driver_info=None, **options)


def check_redis_url(url: str) -> None:
    """Raises RedisUrlError unless ``url`` is a redis:// or rediss:// URL this mesh supports."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise RedisUrlError(f"not a redis:// or rediss:// URL with a host: {redact_url(url)!r}")
    options = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(options) - set(_TLS_FILES))
    if unknown:
        raise RedisUrlError(f"unsupported option(s) {', '.join(unknown)} in {redact_url(url)!r}; "
                            f"a URL may name only {', '.join(_TLS_FILES)} (with rediss://)")
    if options and parts.scheme != "rediss":
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
