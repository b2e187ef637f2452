"""Sampling: the one value type for how tokens are picked, from the caller to the engine.

The gateway takes it from the public ``SamplingParams``, the prompt-cache key
digests it, the engine samples by it. The three protos' sampling messages share
their field names, so one ``from_pb`` / ``to_pb`` pair serves them all.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# float32 on the wire: 0.7 arrives as 0.699999988; rounding gives back the caller's literal.
_FLOAT_DIGITS = 6


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 0  # 0 = the server's default
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.0  # 0 = unset (1.0)
    top_k: int = 0  # 0 = unset
    seed: int | None = None  # None = a fresh random seed
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def deterministic(self) -> bool:
        """The one rule for what may be cached: the same request always gives the same answer."""
        return self.greedy or self.seed is not None

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
        )

    def to_pb(self, message_type):
        pb = message_type(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                          top_p=self.top_p, top_k=self.top_k, stop=list(self.stop))
        if self.seed is not None:
            pb.seed = self.seed
        return pb
