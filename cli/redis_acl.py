"""Redis users with least privilege: deploy/redis/users.acl rendered with real passwords.

The shipped file is a template: each user's password is a placeholder that
redis-server refuses. ``render`` replaces each by ``#<sha256 of the password>``
(Redis never sees a password in the file) and drops the comments, which ACL
files cannot hold. The passwords go to ``redis.env`` (mode 0600), with each
service's URL, as ``nlpmesh redis-acl`` writes them; ``nlpmesh up`` makes its own
for its private redis-server.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cli.topology import REPO_ROOT

TEMPLATE = REPO_ROOT / "deploy" / "redis" / "users.acl"
SERVICE_USERS = ("gateway", "cache", "inference")
USERS = (*SERVICE_USERS, "admin")  # admin: for an operator, never given to a service
ACL_FILE = "users.acl"
ENV_FILE = "redis.env"
_PLACEHOLDER = re.compile(r"#\{(\w+)_password_sha256\}")
_PASSWORD = re.compile(r"[A-Za-z0-9._~-]{16,}")  # safe unquoted in a URL, an ACL line and a .env file


def password_env(user: str) -> str:
    """The variable holding ``user``'s password (in redis.env, .env, or the environment)."""
    return f"NLPMESH_REDIS_{user.upper()}_PASSWORD"


def url_env(user: str) -> str:
    """The service's own Redis URL variable, which its settings read before REDIS_URL."""
    return f"NLPMESH_{user.upper()}_REDIS_URL"


@dataclass(frozen=True)
class RedisUsers:
    passwords: dict[str, str]

    @classmethod
    def make(cls, given: dict[str, str] | None = None) -> RedisUsers:
        """Each user's password from ``given``, else a new random one."""
        passwords = {user: (given or {}).get(user) or secrets.token_urlsafe(32) for user in USERS}
        for user, password in passwords.items():
            if not _PASSWORD.fullmatch(password):
                raise ValueError(f"{password_env(user)}: use 16 or more of A-Z a-z 0-9 . _ ~ -")
        return cls(passwords)

    def render(self, template: str) -> str:
        """The ACL file: placeholders replaced by password hashes, comments and blank lines dropped."""
        def hashed(match: re.Match) -> str:
            if match[1] not in self.passwords:
                raise ValueError(f"the ACL template names an unknown user {match[1]!r}")
            return "#" + hashlib.sha256(self.passwords[match[1]].encode()).hexdigest()
        lines = [line for line in template.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return "\n".join(_PLACEHOLDER.sub(hashed, line) for line in lines) + "\n"

    def url(self, user: str, host: str, port: int, scheme: str = "redis") -> str:
        return f"{scheme}://{user}:{quote(self.passwords[user], safe='')}@{host}:{port}/0"

    def env(self, host: str, port: int) -> str:
        """redis.env: every password (compose reads these) and every service's URL."""
        lines = ["# nlpmesh Redis users (nlpmesh redis-acl). Secret: keep it mode 0600, out of git."]
        lines += [f"{password_env(user)}={self.passwords[user]}" for user in USERS]
        lines += [f"{url_env(user)}={self.url(user, host, port)}" for user in SERVICE_USERS]
        return "\n".join(lines) + "\n"


def generate(out_dir: Path, host: str = "redis", port: int = 6379, rotate: bool = False) -> tuple[Path, Path]:
    """``nlpmesh redis-acl``: each password from the environment, else kept from an
    earlier ``out_dir/redis.env`` (unless ``rotate``), else new."""
    kept = {} if rotate else read_passwords(out_dir / ENV_FILE)
    users = RedisUsers.make({**kept, **passwords_from_environment()})
    return write(out_dir, users, host, port)


def write(out_dir: Path, users: RedisUsers, host: str, port: int, template: Path = TEMPLATE) -> tuple[Path, Path]:
    """Writes ``users.acl`` and ``redis.env`` into ``out_dir``; returns their paths.

    Each file is rewritten in place, not replaced, so a container that
    bind-mounts users.acl sees the new one (ACL LOAD, or a restart).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    acl, env = out_dir / ACL_FILE, out_dir / ENV_FILE
    _write_private(env, users.env(host, port), 0o600)
    # Hashes only; world-readable so the redis user of a container can read the mounted file.
    _write_private(acl, users.render(template.read_text()), 0o644)
    return acl, env


def read_passwords(env_file: Path) -> dict[str, str]:
    """The passwords an earlier redis.env holds (none if there is no such file)."""
    if not env_file.exists():
        return {}
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                  if "=" in line and not line.startswith("#"))
    return {user: values[password_env(user)] for user in USERS if values.get(password_env(user))}


def passwords_from_environment() -> dict[str, str]:
    return {user: os.environ[password_env(user)] for user in USERS if os.environ.get(password_env(user))}


def _write_private(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # an existing file keeps its old mode through os.open
    with os.fdopen(fd, "w") as file:
        file.write(text)
