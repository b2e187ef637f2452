"""Sampling: the one value type for how tokens are picked, from the caller to the engine.

The gateway takes it from the public ``SamplingParams``, the prompt-cache key
digests it, the engine samples by it. The three protos' sampling messages share
their field names, so one ``from_pb`` / ``to_pb`` pair serves them all.

The ranges every field must be in are written here once (``SamplingLimits``,
``Sampling.violations``): the gateway holds callers to the public API's
ranges, the inference service to the same ranges narrowed by its settings.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from meshkit.errors import FieldViolation
from meshkit.response_format import ResponseFormat

# float32 on the wire: 0.7 arrives as 0.699999988; rounding gives back the caller's literal.
_FLOAT_DIGITS = 6


@dataclass(frozen=True)
class SamplingLimits:
    """The upper ends of the sampling ranges; the defaults are the public API's (docs/api.md)."""

    # Past 2 the distribution over a 49k vocabulary is close to uniform: text, not
    # language. OpenAI's API stops at 2 as well, so callers' settings carry over.
    max_temperature: float = 2.0
    # Beyond a few hundred candidates top-k no longer changes what is sampled; 1000
    # bounds the sort the sampler pays for and stays well under any vocabulary.
    max_top_k: int = 1000
    max_new_tokens: int = 2048
    max_stop_sequences: int = 4
    max_stop_chars: int = 64
    # OpenAI's ranges for the penalties, and its bound on the alternatives per token.
    max_repetition_penalty: float = 2.0
    max_abs_penalty: float = 2.0
    max_logprobs: int = 20


API_LIMITS = SamplingLimits()


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 0  # 0 = the server's default
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.0  # 0 = unset (1.0)
    top_k: int = 0  # 0 = unset
    seed: int | None = None  # None = a fresh random seed
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 0.0  # 0 = unset (1: none)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None = none; k = each token's log-probability and the k most likely
    # The form the answer must take (guided decoding); None = free text. The public API carries it beside
    # the sampling (GenerateRequest.response_format), the internal protos inside it.
    response_format: ResponseFormat | None = None

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty not in (0.0, 1.0) or bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def deterministic(self) -> bool:
        """The same request always gives the same answer."""
        return self.greedy or self.seed is not None

    @property
    def cacheable(self) -> bool:
        """The one rule for what may be read from or written to the prompt cache, or shared with identical
        requests: a deterministic answer, without log-probabilities (which the cache does not hold)."""
        return self.deterministic and self.logprobs is None

    def violations(self, limits: SamplingLimits = API_LIMITS) -> list[FieldViolation]:
        """Every field out of its range, named as the public API names it (``sampling.top_p``)."""
        found = []
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= limits.max_temperature):
            found.append(FieldViolation("sampling.temperature",
                                        f"must be a number in [0, {limits.max_temperature:g}] (0 = greedy)"))
        if not (math.isfinite(self.top_p) and 0 <= self.top_p <= 1):
            found.append(FieldViolation("sampling.top_p", "must be a number in [0, 1] (0 = unset, the same as 1)"))
        if not 0 <= self.top_k <= limits.max_top_k:
            found.append(FieldViolation("sampling.top_k", f"must be in [0, {limits.max_top_k}] (0 = unset)"))
        if not 0 <= self.max_new_tokens <= limits.max_new_tokens:
            found.append(FieldViolation("sampling.max_new_tokens",
                                        f"must be in [0, {limits.max_new_tokens}] (0 = the server's default)"))
        if not (math.isfinite(self.repetition_penalty) and 0 <= self.repetition_penalty
                <= limits.max_repetition_penalty):
            found.append(FieldViolation("sampling.repetition_penalty",
                                        f"must be a number in [0, {limits.max_repetition_penalty:g}] (0 = unset, 1)"))
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and abs(value) <= limits.max_abs_penalty):
                found.append(FieldViolation(f"sampling.{name}", f"must be a number in [-{limits.max_abs_penalty:g}, "
                                                                f"{limits.max_abs_penalty:g}] (0 = off)"))
        if self.logprobs is not None and not 0 <= self.logprobs <= limits.max_logprobs:
            found.append(FieldViolation("sampling.logprobs", f"must be in [0, {limits.max_logprobs}] when set"))
        found += self.response_format.violations() if self.response_format is not None else []
        return found + self._stop_violations(limits)

    def _stop_violations(self, limits: SamplingLimits) -> list[FieldViolation]:
        if len(self.stop) > limits.max_stop_sequences:
            return [FieldViolation("sampling.stop", f"at most {limits.max_stop_sequences} stop sequences")]
        if any(not text for text in self.stop):
            return [FieldViolation("sampling.stop", "a stop sequence must not be empty")]
        if any(len(text) > limits.max_stop_chars for text in self.stop):
            return [FieldViolation("sampling.stop", f"a stop sequence has at most {limits.max_stop_chars} characters")]
        return []

    def with_max_new_tokens(self, max_new_tokens: int) -> Sampling:
        return dataclasses.replace(self, max_new_tokens=max_new_tokens)

    @classmethod
    def from_pb(cls, pb) -> Sampling:
        """From any of nlpmesh's sampling messages (gateway SamplingParams, inference and cache Sampling)."""
        return cls(
            max_new_tokens=pb.max_new_tokens,
            temperature=round(pb.temperature, _FLOAT_DIGITS),
            top_p=round(pb.top_p, _FLOAT_DIGITS),
            top_k=pb.top_k,
            seed=pb.seed if pb.HasField("seed") else None,
            stop=tuple(pb.stop),
            repetition_penalty=round(pb.repetition_penalty, _FLOAT_DIGITS),
            presence_penalty=round(pb.presence_penalty, _FLOAT_DIGITS),
            frequency_penalty=round(pb.frequency_penalty, _FLOAT_DIGITS),
            logprobs=pb.logprobs if pb.HasField("logprobs") else None,
            response_format=(ResponseFormat.from_pb(pb.response_format)
                             if "response_format" in pb.DESCRIPTOR.fields_by_name else None),
        )

    def to_pb(self, message_type):
        pb = message_type(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                          top_p=self.top_p, top_k=self.top_k, stop=list(self.stop),
                          repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                          frequency_penalty=self.frequency_penalty)
        if self.seed is not None:
            pb.seed = self.seed
        if self.logprobs is not None:
            pb.logprobs = self.logprobs
        if self.response_format is not None:
            if "response_format" not in pb.DESCRIPTOR.fields_by_name:
                raise ValueError(f"{pb.DESCRIPTOR.full_name} has no response_format: the request carries it")
            self.response_format.to_pb(pb.response_format)
        return pb
