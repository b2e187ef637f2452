"""API keys: minted once, stored only as hashes, in a file every gateway replica re-reads.

A key is ``nlpm_<key_id>_<secret>``: ``key_id`` (16 hex digits) names the key in
the clear, for lookup, listing and revoking; ``secret`` is 256 random bits
(``secrets.token_urlsafe``). The file keeps the key id, the tenant and its limits,
and the sha256 of the secret, never the key. The secret has full entropy, so one
sha256 is enough (a slow password hash would buy nothing).

The file (TOML, mode 0600), one table per key::

    [keys.3f9a0c1d2e4b5a6f]
    tenant = "acme"
    secret_sha256 = "<64 hex digits>"
    created = "2026-01-31T12:00:00Z"
    prompt_cache = true
    requests_per_s = 5.0     # each limit absent = none
    tokens_per_min = 20000
    max_streams = 4
    templates = ["finance_qa"]  # the key's scope; each absent = every one
    models = ["smollm2"]

Writers (``nlpmesh keys``) replace it atomically under a lock file, so a gateway
never reads half a file and two writers never lose each other's key.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.tenant import KeyScope, Tenant, TenantLimits

KEY_PREFIX = "nlpm"
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
# Tenant ids travel as gRPC metadata and into logs: a short, plain charset.
_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Template and model ids in a key's scope are written into the file unescaped: a plain charset.
_SCOPE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
MAX_SCOPE_IDS = 256


class KeyFileError(ValueError):
    """The keys file cannot be read as a keys file (its content is never in the message)."""


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: Tenant
    secret_sha256: str
    created: str = ""

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(self.secret_sha256, secret_digest(secret))


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not _KEY_ID.match(key_id) or len(secret) < 16:
        return None
    return key_id, secret


def check_tenant_id(tenant_id: str) -> str:
    if not _TENANT_ID.match(tenant_id):
        raise ValueError(f"tenant id {tenant_id!r}: 1 to 64 of letters, digits, '.', '_', '-', "
                         "starting with a letter or digit")
    return tenant_id


def load_keys(path: Path) -> dict[str, KeyRecord]:
    """The file's keys by key id; a missing file holds none. Raises KeyFileError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise KeyFileError(f"{path}: cannot read ({type(error).__name__})") from None
    return parse_keys(data, str(path))


def parse_keys(data: bytes, where: str = "keys file") -> dict[str, KeyRecord]:
    try:
        document = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise KeyFileError(f"{where}: not TOML ({type(error).__name__})") from None
    tables = document.get("keys", {})
    if not isinstance(tables, dict):
        raise KeyFileError(f"{where}: [keys] must be a table")
    return {key_id: _record(key_id, table, where) for key_id, table in tables.items()}


def _record(key_id: str, table, where: str) -> KeyRecord:
    try:
        if not _KEY_ID.match(key_id) or not isinstance(table, dict):
            raise ValueError("bad key id")
        if not _SHA256_HEX.match(str(table["secret_sha256"])):
            raise ValueError("bad secret_sha256")
        limits = TenantLimits(
            requests_per_s=_optional(table, "requests_per_s", float),
            tokens_per_min=_optional(table, "tokens_per_min", int),
            max_streams=_optional(table, "max_streams", int),
        )
        prompt_cache = table.get("prompt_cache", True)
        if not isinstance(prompt_cache, bool):
            raise ValueError("prompt_cache must be true or false")
        scope = KeyScope(_scope_ids(table, "templates"), _scope_ids(table, "models"))
        tenant = Tenant(check_tenant_id(str(table["tenant"])), limits, prompt_cache, scope)
        return KeyRecord(key_id, tenant, table["secret_sha256"], str(table.get("created", "")))
    except (KeyError, TypeError, ValueError) as error:
        # Names the key id and the problem only: never a hash or a value.
        raise KeyFileError(f"{where}: key {key_id[:16]!r} is invalid ({type(error).__name__})") from None


def _optional(table: dict, name: str, kind: type):
    value = table.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0")
    return kind(value)


def check_scope_ids(what: str, ids) -> frozenset[str]:
    """A key's scope list (``templates`` or ``models``), validated; ValueError names what is wrong."""
    if not isinstance(ids, list | tuple | set | frozenset) or not ids:
        raise ValueError(f"{what} must be a non-empty list of ids")
    if len(ids) > MAX_SCOPE_IDS:
        raise ValueError(f"{what}: at most {MAX_SCOPE_IDS} ids")
    for one in ids:
        if not isinstance(one, str) or not _SCOPE_ID.match(one):
            raise ValueError(f"{what}: each id is 1 to 128 of letters, digits, '.', '_', ':', '/', '-'")
    return frozenset(ids)


def _scope_ids(table: dict, what: str) -> frozenset[str] | None:
    return None if what not in table else check_scope_ids(what, table[what])


def render_keys(records: dict[str, KeyRecord]) -> str:
    """The file's text. Every value is validated or generated, so no escaping is needed."""
    lines = ["# nlpmesh API keys: key ids, tenants, limits and the sha256 of each key's secret.",
             "# Managed by `nlpmesh keys`; the keys themselves are shown once, at creation, and kept nowhere.", ""]
    for record in records.values():
        tenant = record.tenant
        lines += [f"[keys.{record.key_id}]", f'tenant = "{tenant.id}"', f'secret_sha256 = "{record.secret_sha256}"',
                  f'created = "{record.created}"', f"prompt_cache = {'true' if tenant.prompt_cache else 'false'}"]
        for name, value in (("requests_per_s", tenant.limits.requests_per_s),
                            ("tokens_per_min", tenant.limits.tokens_per_min),
                            ("max_streams", tenant.limits.max_streams)):
            if value is not None:
                lines.append(f"{name} = {value!r}")
        for name, ids in (("templates", tenant.scope.templates), ("models", tenant.scope.models)):
            if ids is not None:
                lines.append(f"{name} = [" + ", ".join(f'"{one}"' for one in sorted(ids)) + "]")
        lines.append("")
    return "\n".join(lines)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: Path, records: dict[str, KeyRecord]) -> None:
    """Replaces the file at once (a reader sees the old file or the new one), mode 0600."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:  # mkstemp made it 0600
            out.write(render_keys(records))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def create_key(path: Path, tenant: Tenant) -> tuple[str, str]:
    """Adds a new key for ``tenant``; returns (key_id, key). The key exists nowhere else: show it once."""
    check_tenant_id(tenant.id)
    for what, ids in (("templates", tenant.scope.templates), ("models", tenant.scope.models)):
        if ids is not None:
            check_scope_ids(what, ids)
    with _locked(path):
        records = load_keys(path)
        key_id = secrets.token_hex(8)
        while key_id in records:
            key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        records[key_id] = KeyRecord(key_id, tenant, secret_digest(secret), created)
        _write(path, records)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def revoke_key(path: Path, key_id: str) -> bool:
    """Removes the key; False when there is no such key id."""
    with _locked(path):
        records = load_keys(path)
        if records.pop(key_id, None) is None:
            return False
        _write(path, records)
    return True
