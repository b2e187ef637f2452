"""The exact-match prompt cache key, derived in this one place.

The gateway derives a ``PromptCacheKey`` once per request (after resolving
defaults such as ``max_new_tokens`` 0 and the template's newest version), looks
it up, and hands the same key to the cache service to store the answer
(``to_pb`` / ``from_pb``): the key a hit looks up is the key the miss stored.

    key = PromptCacheKey(tenant, model, revision,
                         TemplatePrompt(id, version, variables) | ChatPrompt(messages),
                         Sampling(max_new_tokens, temperature, top_p, top_k, seed, stop))
    key.redis_key(prefix)  ->  "<prefix>:t:<tenant_tag>:{<tenant_tag>:tpl:<sha(id)[:16]>}:e:<key.digest()>"
                               (a template's answer: its hash tag is the tenant + template group)
                           ->  "<prefix>:t:<tenant_tag>:e:<key.digest()>"   (a chat answer: no tag)

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

Hash tags (for Redis Cluster, harmless on one node): a template's answers and
that template's invalidation index (``template_index``) share the tag
``{<tenant_tag>:tpl:<sha(id)[:16]>}``, so one tenant's template lives in one
slot (its invalidation is one transaction) and tenants and templates spread
over the masters. A chat answer is touched alone (no template index), so it
has no tag and spreads by its whole name. A model's index has its own tag
(``model_index``); its members live in many slots.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from nlpmesh.cache.v1 import cache_pb2

from meshkit.errors import FieldViolation, InvalidArgument
from meshkit.sampling import Sampling

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
            "sampling": _canonical_sampling(self.sampling),
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def digest(self) -> str:
        return _sha256(self.canonical_json())

    def redis_key(self, prefix: str) -> str:
        namespace = tenant_namespace(prefix, self.tenant)
        if isinstance(self.prompt, TemplatePrompt):
            return f"{namespace}:{{{template_group(tenant_tag(self.tenant), self.prompt.id)}}}:e:{self.digest()}"
        return f"{namespace}:e:{self.digest()}"

    def to_pb(self) -> cache_pb2.PromptCacheKey:
        pb = cache_pb2.PromptCacheKey(tenant=self.tenant, model=self.model, revision=self.revision,
                                      sampling=self.sampling.to_pb(cache_pb2.Sampling))
        if isinstance(self.prompt, TemplatePrompt):
            pb.template.id = self.prompt.id
            pb.template.version = self.prompt.version
            pb.template.variables.update(self.prompt.variables)
        else:
            pb.chat.messages.extend(cache_pb2.ChatMessage(role=r, content=c) for r, c in self.prompt.messages)
        return pb

    @classmethod
    def from_pb(cls, pb: cache_pb2.PromptCacheKey, path: str = "key") -> PromptCacheKey:
        """The key, or InvalidArgument naming every bad field under ``path``."""
        violations: list[FieldViolation] = []
        _require(violations, pb.model, f"{path}.model")
        _require(violations, pb.revision, f"{path}.revision")
        prompt = _prompt_from_pb(pb, path, violations)
        if violations:
            raise InvalidArgument("invalid cache key", violations)
        return cls(pb.tenant, pb.model, pb.revision, prompt, Sampling.from_pb(pb.sampling))


def _prompt_from_pb(pb: cache_pb2.PromptCacheKey, path: str, violations: list[FieldViolation]
                    ) -> TemplatePrompt | ChatPrompt | None:
    kind = pb.WhichOneof("prompt")
    if kind == "template":
        _require(violations, pb.template.id, f"{path}.template.id")
        _require(violations, pb.template.version, f"{path}.template.version")
        return TemplatePrompt(pb.template.id, pb.template.version, json_format.MessageToDict(pb.template.variables))
    if kind == "chat":
        messages = pb.chat.messages
        if not messages:
            violations.append(FieldViolation(f"{path}.chat.messages", "must not be empty"))
        for i, message in enumerate(messages):
            _require(violations, message.role, f"{path}.chat.messages[{i}].role")
        return ChatPrompt(tuple((m.role, m.content) for m in messages))
    violations.append(FieldViolation(f"{path}.prompt", "set template or chat"))
    return None


def _require(violations: list[FieldViolation], value: str, field: str) -> None:
    if not value:
        violations.append(FieldViolation(field, "must not be empty"))


def _canonical_sampling(sampling: Sampling) -> dict:
    fields = {"max_new_tokens": sampling.max_new_tokens, "stop": list(sampling.stop)}
    if sampling.penalised:  # absent when off, so the keys of answers stored before the penalties stay as they were
        fields |= {"repetition_penalty": _round(sampling.repetition_penalty or 1.0),
                   "presence_penalty": _round(sampling.presence_penalty),
                   "frequency_penalty": _round(sampling.frequency_penalty)}
    if sampling.response_format is not None:  # absent when unset: free-text keys stay as they were
        fields |= {"response_format": sampling.response_format.canonical()}
    if sampling.greedy:
        return fields | {"temperature": 0}
    return fields | {
        "temperature": _round(sampling.temperature),
        "top_p": _round(sampling.top_p),
        "top_k": sampling.top_k,
        "seed": sampling.seed,
    }


def tenant_tag(tenant: str) -> str:
    """A short stable name for a tenant that does not reveal it."""
    return _sha256(tenant)[:16]


def tenant_namespace(prefix: str, tenant: str) -> str:
    """Where every Redis key of one tenant lives: ``<prefix>:t:<tenant_tag>``."""
    return f"{prefix}:t:{tenant_tag(tenant)}"


def check_prefix(prefix: str) -> str:
    """``prefix``, unless it holds a brace (it would become the keys' hash tag in a Redis Cluster)."""
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"a Redis key prefix may not hold {{ or }}: {prefix!r}")
    return prefix


def template_group(tag: str, template_id: str) -> str:
    """The hash tag (without braces) of one tenant's answers from one template, ``tag`` = ``tenant_tag``."""
    return f"{tag}:tpl:{short_hash(template_id)}"


def template_index(prefix: str, tag: str, template_id: str) -> str:
    """Sorted set of the keys of one tenant's answers from one template: in their slot."""
    return f"{prefix}:t:{tag}:{{{template_group(tag, template_id)}}}:ix:tpl"


def model_index(prefix: str, tag: str, model: str) -> str:
    """Sorted set of the keys of one tenant's answers made by one model: a slot of its own."""
    return f"{prefix}:t:{tag}:{{{tag}:model:{short_hash(model)}}}:ix:model"


def short_hash(text: str) -> str:
    return _sha256(text)[:16]


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
