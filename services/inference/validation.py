"""Checks a generation request against the engine's limits and the model's context.

Field paths are the public API's names (``sampling.top_p``, ``prompt``), so the
gateway can pass the violations through to its caller unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from meshkit.errors import FieldViolation, InvalidArgument
from meshkit.sampling import API_LIMITS, SamplingLimits
from services.inference.generation_types import GenerationRequest


@dataclass(frozen=True)
class RequestLimits:
    context_length: int
    vocab_size: int
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 2048
    max_stop_sequences: int = 4
    max_stop_chars: int = 64

    @property
    def sampling(self) -> SamplingLimits:
        """The public API's sampling ranges, with this service's own limits on length and stops."""
        return dataclasses.replace(API_LIMITS, max_new_tokens=self.max_new_tokens_limit,
                                   max_stop_sequences=self.max_stop_sequences, max_stop_chars=self.max_stop_chars)


def resolve_request(request: GenerationRequest, limits: RequestLimits) -> GenerationRequest:
    """The request with defaults filled in, or InvalidArgument naming every bad field."""
    violations = request.sampling.violations(limits.sampling) + _prompt_violations(request, limits)
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(summary, violations)
    sampling = request.sampling
    max_new_tokens = sampling.max_new_tokens or _default_max_new_tokens(request, limits)
    resolved = dataclasses.replace(sampling, max_new_tokens=max_new_tokens, top_p=sampling.top_p or 1.0)
    over = len(request.prompt_token_ids) + max_new_tokens - limits.context_length
    if over > 0:
        raise InvalidArgument.for_field(
            "prompt",
            f"{len(request.prompt_token_ids)} prompt tokens + {max_new_tokens} new tokens "
            f"exceed the model's context of {limits.context_length} tokens",
        )
    return dataclasses.replace(request, sampling=resolved)


def _default_max_new_tokens(request: GenerationRequest, limits: RequestLimits) -> int:
    # A caller who did not ask for a length gets what fits, up to the default.
    room = limits.context_length - len(request.prompt_token_ids)
    return max(1, min(limits.default_max_new_tokens, room))


def _prompt_violations(request: GenerationRequest, limits: RequestLimits) -> list[FieldViolation]:
    ids = request.prompt_token_ids
    if not ids:
        return [FieldViolation("prompt", "the prompt has no tokens")]
    if min(ids) < 0 or max(ids) >= limits.vocab_size:
        return [FieldViolation("prompt", f"token ids must be in [0, {limits.vocab_size})")]
    if len(ids) >= limits.context_length:
        no_room = f"{len(ids)} prompt tokens leave no room in the context of {limits.context_length}"
        return [FieldViolation("prompt", no_room)]
    return []
