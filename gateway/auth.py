"""Who is calling: the tenant named by the caller's ``authorization: Bearer <key>``.

``KeyFileAuth`` checks keys against the keys file (gateway/api_keys.py).
A background task stats the file every ``reload_s`` and re-reads it when it
changed, so a key created or revoked with ``nlpmesh keys`` takes effect on every
replica within seconds, without a restart. On the request's path a key already
seen costs one dict lookup; a new one costs one sha256, then joins a bounded
map of verified keys that every reload empties.

``OpenAccess`` is auth turned off: every caller is one tenant.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from gateway.api_keys import KeyFileError, KeyRecord, load_keys, parse_key
from gateway.tenant import Tenant
from meshkit.errors import Unauthenticated

log = logging.getLogger("nlpmesh.gateway.auth")

AUTHORIZATION = "authorization"
# Messages never echo what the caller sent.
MISSING = "missing API key: send the metadata 'authorization: Bearer <key>'"
MALFORMED = "malformed API key: expected 'authorization: Bearer nlpm_<key_id>_<secret>'"
UNKNOWN = "unknown or revoked API key"

_Signature = tuple[int, int, int] | None  # (mtime_ns, size, inode); None = no file
_UNREAD: _Signature = (-1, -1, -1)


class OpenAccess:
    """Auth off: every caller is ``tenant``."""

    def __init__(self, tenant: Tenant):
        self._tenant = tenant

    def tenant_for(self, metadata: Iterable[tuple[str, str]]) -> Tenant:
        return self._tenant

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class KeyFileAuth:
    def __init__(self, path: Path, reload_s: float = 1.0, cache_size: int = 10_000):
        self._path = Path(path)
        self._reload_s = reload_s
        self._cache_size = cache_size
        self._records: dict[str, KeyRecord] = {}
        self._verified: dict[str, Tenant] = {}  # the authorization value -> its tenant
        self._signature: _Signature = _UNREAD
        self._task: asyncio.Task | None = None
        self.reload_if_changed()

    def tenant_for(self, metadata: Iterable[tuple[str, str]]) -> Tenant:
        """The caller's tenant; Unauthenticated when the key is missing, malformed, unknown or revoked."""
        header = next((value for name, value in metadata if name == AUTHORIZATION), None)
        if header is None:
            raise Unauthenticated(MISSING)
        tenant = self._verified.get(header)
        if tenant is not None:
            return tenant
        return self._verify(header)

    def _verify(self, header: str) -> Tenant:
        scheme, _, key = header.strip().partition(" ")
        parsed = parse_key(key.strip()) if scheme.lower() == "bearer" else None
        if parsed is None:
            raise Unauthenticated(MALFORMED)
        key_id, secret = parsed
        record = self._records.get(key_id)
        if record is None or not record.matches(secret):
            raise Unauthenticated(UNKNOWN)
        if len(self._verified) >= self._cache_size:
            del self._verified[next(iter(self._verified))]  # the oldest verified: the map stays bounded
        self._verified[header] = record.tenant
        return record.tenant

    @property
    def key_count(self) -> int:
        return len(self._records)

    def reload_if_changed(self) -> bool:
        """Re-reads the file if it changed since the last look; True when the keys were replaced.

        A missing file holds no keys (every call is refused). A file that cannot
        be parsed keeps the keys read before, and is logged once per change.
        """
        signature = self._stat()
        if signature == self._signature:
            return False
        records = self._read(signature)
        if records is None:
            return False
        self._apply(records)
        return True

    def _apply(self, records: dict[str, KeyRecord]) -> None:
        # Both replaced by plain assignment, so a request sees the old pair or the new one.
        self._records = records
        self._verified = {}

    def _stat(self) -> _Signature:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return None
        except OSError:
            return self._signature  # unreadable for now: keep what we have, look again later
        if st.st_mode & 0o077 and self._signature == _UNREAD:
            log.warning("keys file %s is readable by other users (mode %o): chmod 600 it",
                        self._path, st.st_mode & 0o777)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def start(self) -> None:
        """Starts the watcher on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._reload_s)
            try:
                signature = self._stat()
                if signature != self._signature:
                    # Parsing runs off the event loop; the swap happens on it.
                    records = await asyncio.to_thread(self._read, signature)
                    if records is not None:
                        self._apply(records)
            except Exception:
                log.exception("keys file watch failed; trying again")

    def _read(self, signature: _Signature) -> dict[str, KeyRecord] | None:
        """The new keys, or None to keep the old ones (logged)."""
        self._signature = signature
        if signature is None:
            log.warning("keys file %s does not exist: every call is refused until it does "
                        "(`nlpmesh keys create --file %s --tenant NAME`)", self._path, self._path)
            return {}
        try:
            records = load_keys(self._path)
        except KeyFileError as error:
            log.error("keys file not reloaded, the %d keys read before stay in force: %s",
                      len(self._records), error)
            return None
        log.info("keys file %s read: %d keys", self._path, len(records))
        return records

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def authenticator(settings) -> KeyFileAuth | OpenAccess:
    """What the gateway's settings ask for; auth off is said loudly."""
    if settings.auth == "off":
        log.warning("auth is OFF (NLPMESH_GATEWAY_AUTH=off): every caller is tenant %r, no key is checked",
                    settings.tenant)
        return OpenAccess(Tenant(settings.tenant))
    return KeyFileAuth(settings.auth_keys_file, settings.auth_reload_s, settings.auth_cache_size)
