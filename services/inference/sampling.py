"""Picks the next token from the model's logits: argmax, or a seeded draw.

The temperature / top-k / top-p filters are transformers' own logits warpers,
so a sampled request behaves as it would under ``model.generate``.
"""
from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from meshkit.sampling import Sampling


class TokenSampler:
    def __init__(self, sampling: Sampling):
        self._greedy = sampling.greedy
        self._warpers = _warpers(sampling)
        # One generator per request: a seeded request draws the same tokens
        # whatever else the engine runs meanwhile.
        self._generator = torch.Generator()
        if sampling.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(sampling.seed)

    def __call__(self, token_ids: list[int], logits: torch.Tensor) -> int:
        """The next token, given all ids so far and the last position's logits (1, vocab)."""
        if self._greedy:
            return int(torch.argmax(logits, dim=-1)[0])
        scores = self._warpers(torch.tensor([token_ids]), logits)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self._generator)[0, 0])


def _warpers(sampling: Sampling) -> LogitsProcessorList:
    if sampling.greedy:
        return LogitsProcessorList()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if 0 < sampling.top_p < 1:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers
