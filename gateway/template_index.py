"""The gateway's view of the template catalog.

Templates are immutable per version, so the prompt-cache key needs only the
resolved version, never the rendered text: with this view the gateway
resolves "newest" itself and a cache hit costs no template hop.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from gateway.downstream import TemplateEntry

log = logging.getLogger("nlpmesh.gateway.template_index")

# A template unknown to this view triggers at most one refresh per interval.
_MISS_REFRESH_S = 1.0


class TemplateIndex:
    def __init__(self, fetch: Callable[[], Awaitable[list[TemplateEntry]]], refresh_s: float):
        self._fetch = fetch
        self._refresh_s = refresh_s
        self._entries: list[TemplateEntry] = []
        self._newest: dict[str, str] = {}
        self._versions: set[tuple[str, str]] = set()
        self._fetched_at = float("-inf")

    @property
    def entries(self) -> list[TemplateEntry]:
        return list(self._entries)

    async def refresh(self) -> None:
        entries = await self._fetch()
        self._entries = entries
        self._versions = {(e.id, e.version) for e in entries}
        self._newest = {e.id: e.version for e in entries if e.newest}
        self._fetched_at = time.monotonic()

    async def resolve(self, template_id: str, version: str) -> str | None:
        """The concrete version a call names, or None when this view doesn't know it."""
        age = time.monotonic() - self._fetched_at
        resolved = self._lookup(template_id, version)
        stale = age > self._refresh_s or (resolved is None and age > _MISS_REFRESH_S)
        if stale:
            try:
                await self.refresh()
            except Exception as error:  # the view is an optimisation: keep the old one
                log.warning("template catalog refresh failed: %s", type(error).__name__)
            resolved = self._lookup(template_id, version)
        return resolved

    def known_version(self, template_id: str, version: str) -> str | None:
        """The concrete version a call names, as this view knows it now (no refresh), or None."""
        return self._lookup(template_id, version)

    def _lookup(self, template_id: str, version: str) -> str | None:
        if not version:
            return self._newest.get(template_id)
        return version if (template_id, version) in self._versions else None
