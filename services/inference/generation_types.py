"""What a caller hands the engine and what comes back: plain values, no protobuf."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from opentelemetry.context import Context

from meshkit.sampling import Sampling


class FinishReason(enum.IntEnum):
    # nlpmesh.inference.v1.FinishReason's values, copied: this core imports no protobuf
    # (tests/unit/test_proto_enum_values.py checks them against the generated module).
    STOP = 1  # the model produced an end-of-sequence token
    LENGTH = 2  # max_new_tokens reached
    STOP_SEQUENCE = 3  # a caller's stop sequence appeared in the text
    CANCELLED = 4  # the caller went away


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    request_id: str = ""
    tenant: str = ""  # whose prompt: prefix KV is never shared across tenants
    # When the caller stops waiting (time.monotonic()); None: never. Waiting prefills go earliest deadline
    # first, and one whose first token cannot come by it is refused before any compute.
    deadline: float | None = None
    # The caller's trace context: the engine's spans are its children. None = not traced.
    trace_context: Context | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str  # the token alone, decoded
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely tokens at its position."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Delta:
    """New text since the previous item; never ends inside a character."""

    text: str
    # Sampling.logprobs set: the tokens generated since the previous item (one whose text is held back
    # comes later).
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The last item of every stream."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens no Delta carried
