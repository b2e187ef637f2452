"""The caller's request as a domain object, validated at the edge."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from nlpmesh.gateway.v1 import gateway_pb2

from meshkit.errors import FieldViolation, InvalidArgument
from meshkit.response_format import ResponseFormat
from meshkit.sampling import Sampling

MAX_CHAT_MESSAGES = 64


class CacheMode(enum.IntEnum):
    """nlpmesh.gateway.v1.CacheMode, with what each mode means for the cache."""

    UNSPECIFIED = gateway_pb2.CACHE_MODE_UNSPECIFIED
    USE = gateway_pb2.CACHE_MODE_USE
    BYPASS = gateway_pb2.CACHE_MODE_BYPASS
    REFRESH = gateway_pb2.CACHE_MODE_REFRESH

    @property
    def reads(self) -> bool:
        return self in (CacheMode.UNSPECIFIED, CacheMode.USE)

    @property
    def writes(self) -> bool:
        return self != CacheMode.BYPASS


@dataclass(frozen=True)
class TemplateCall:
    id: str
    version: str  # empty = newest
    variables: dict[str, Any]


@dataclass(frozen=True)
class Chat:
    messages: tuple[tuple[str, str], ...]  # (role, content)


@dataclass(frozen=True)
class PromptRequest:
    prompt: TemplateCall | Chat
    model: str
    sampling: Sampling
    cache_mode: CacheMode
    budget_ms: int

    @property
    def template_id(self) -> str | None:
        return self.prompt.id if isinstance(self.prompt, TemplateCall) else None

    @classmethod
    def from_pb(cls, request) -> PromptRequest:
        """From a public ``GenerateRequest``, validated (InvalidArgument names every bad field)."""
        if request.cache_mode not in CacheMode._value2member_map_:
            raise InvalidArgument.for_field("cache_mode", f"unknown value {request.cache_mode}")
        sampling = Sampling.from_pb(request.sampling)
        if request.HasField("response_format"):
            sampling = dataclasses.replace(sampling, response_format=ResponseFormat.from_pb(request.response_format))
        return validate(cls(prompt_from_pb(request), request.model, sampling, CacheMode(request.cache_mode),
                            request.budget_ms))


def prompt_from_pb(request) -> TemplateCall | Chat:
    """The ``prompt`` oneof of a public ``GenerateRequest`` or ``CountTokensRequest``."""
    which = request.WhichOneof("prompt")
    if which == "template":
        variables = json_format.MessageToDict(request.template.variables)
        return TemplateCall(request.template.id, request.template.version, variables)
    if which == "chat":
        if not request.chat.messages:
            raise InvalidArgument.for_field("chat.messages", "must hold at least one message")
        return Chat(tuple((m.role, m.content) for m in request.chat.messages))
    raise InvalidArgument.for_field("prompt", "set either template or chat")


def validate(request: PromptRequest) -> PromptRequest:
    """Checks what the gateway can judge alone; the services check the rest."""
    violations: list[FieldViolation] = []
    prompt = request.prompt
    if isinstance(prompt, TemplateCall) and not prompt.id:
        violations.append(FieldViolation("template.id", "must not be empty"))
    if isinstance(prompt, Chat) and len(prompt.messages) > MAX_CHAT_MESSAGES:
        violations.append(FieldViolation("chat.messages", f"at most {MAX_CHAT_MESSAGES} messages"))
    violations += request.sampling.violations()  # the public API's ranges (meshkit/sampling.py)
    if violations:
        raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations), violations)
    return request
