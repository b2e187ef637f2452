"""The exact-match prompt cache key, derived in this one place.

The gateway builds a ``PromptCacheKey`` itself (after resolving defaults such
as ``max_new_tokens`` 0 and the template's newest version) and so does the
cache service; both must get the same Redis key for the same request:

    key = PromptCacheKey(tenant, model, revision,
                         TemplatePrompt(id, version, variables) | ChatPrompt(messages),
                         Sampling(max_new_tokens, temperature, top_p, top_k, seed, stop))
    key.redis_key(prefix)  ->  "<prefix>:t:<tenant_tag(tenant)>:e:<key.digest()>"

The digest is sha256 over a canonical JSON of every field (tenant included),
so that:
- variable order does not matter, ``stop`` order does (it is a list);
- floats from protobuf (float32 0.7 is 0.699999988...) equal their Python
  literal: sampling floats are rounded to 6 significant digits;
- whole numbers in variables equal their float form (a Struct carries 3 as 3.0);
- greedy requests (temperature 0) ignore top_p, top_k and seed, which cannot
  change a greedy answer.
The raw tenant (it may come from an API key) never appears in a key name: the
namespace holds a hash of it, which is what per-tenant invalidation scans.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Part of every digest: bump it when the canonical form changes, and old
# entries simply stop matching (they expire by TTL).
KEY_FORMAT = 1
SIGNIFICANT_DIGITS = 6


@dataclass(frozen=True)
class TemplatePrompt:
    id: str
    version: str  # the resolved version, never empty
    variables: Mapping[str, Any] = field(default_factory=dict)

    def canonical(self) -> dict:
        return {"template": self.id, "version": self.version, "variables": _plain(self.variables)}


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[tuple[str, str], ...]  # (role, content)

    def canonical(self) -> dict:
        return {"chat": [[role, content] for role, content in self.messages]}


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_deterministic(self) -> bool:
        """Whether the same request always gives the same answer (worth caching)."""
        return self.is_greedy or self.seed is not None

    def canonical(self) -> dict:
        fields = {"max_new_tokens": self.max_new_tokens, "stop": list(self.stop)}
        if self.is_greedy:
            return fields | {"temperature": 0}
        return fields | {
            "temperature": _round(self.temperature),
            "top_p": _round(self.top_p),
            "top_k": self.top_k,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class PromptCacheKey:
    tenant: str
    model: str
    revision: str
    prompt: TemplatePrompt | ChatPrompt
    sampling: Sampling

    def canonical_json(self) -> str:
        document = {
            "format": KEY_FORMAT,
            "tenant": self.tenant,
            "model": self.model,
            "revision": self.revision,
            "prompt": self.prompt.canonical(),
            "sampling": self.sampling.canonical(),
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def digest(self) -> str:
        return _sha256(self.canonical_json())

    def redis_key(self, prefix: str) -> str:
        return f"{tenant_namespace(prefix, self.tenant)}:e:{self.digest()}"


def tenant_tag(tenant: str) -> str:
    """A short stable name for a tenant that does not reveal it."""
    return _sha256(tenant)[:16]


def tenant_namespace(prefix: str, tenant: str) -> str:
    """Where every Redis key of one tenant lives: ``<prefix>:t:<tenant_tag>``."""
    return f"{prefix}:t:{tenant_tag(tenant)}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _round(number: float) -> float | int:
    if not math.isfinite(number):
        return number
    rounded = float(f"{number:.{SIGNIFICANT_DIGITS}g}")
    return int(rounded) if rounded.is_integer() else rounded


def _plain(value: Any) -> Any:
    """Variables as JSON values, with whole-number floats as ints (3.0 == 3 in a Struct)."""
    if isinstance(value, Mapping):
        return {str(name): _plain(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
