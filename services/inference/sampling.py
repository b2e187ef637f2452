"""Picks the next token from the model's logits: argmax, or a seeded draw.

The temperature / top-k / top-p filters and the repetition penalty are transformers' own
logits processors, so a sampled request behaves as it would under ``model.generate``. The
presence and frequency penalties are OpenAI's (and vLLM's): over the tokens of the answer.
Each applies to its own row's logits only, so a row's tokens never depend on the other rows.
"""
from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from meshkit.sampling import Sampling
from services.inference.generation_types import TokenLogprob, TopLogprob


class TokenSampler:
    def __init__(self, sampling: Sampling):
        self._greedy = sampling.greedy
        self._sampling = sampling
        self._warpers = _warpers(sampling)
        # One generator per request: a seeded request draws the same tokens
        # whatever else the engine runs meanwhile.
        self._generator = torch.Generator()
        if sampling.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(sampling.seed)

    def __call__(self, token_ids: list[int], logits: torch.Tensor, prompt_tokens: int = 0) -> int:
        """The next token, given all ids so far (the first ``prompt_tokens`` of them the prompt) and the last
        position's logits (1, vocab)."""
        if self._sampling.penalised:
            logits = _penalise(self._sampling, token_ids, prompt_tokens, logits)
        if self._greedy:
            return int(torch.argmax(logits, dim=-1)[0])
        scores = self._warpers(torch.tensor([token_ids]), logits)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self._generator)[0, 0])


def _penalise(sampling: Sampling, token_ids: list[int], prompt_tokens: int, logits: torch.Tensor) -> torch.Tensor:
    if sampling.repetition_penalty not in (0.0, 1.0):
        logits = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(torch.tensor([token_ids]), logits)
    answer = token_ids[prompt_tokens:]
    if answer and (sampling.presence_penalty or sampling.frequency_penalty):
        counts = torch.bincount(torch.tensor(answer), minlength=logits.shape[-1])[: logits.shape[-1]]
        logits = logits - (sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0)).to(
            logits.dtype)
    return logits


def token_logprob(logits: torch.Tensor, token: int, alternatives: int, decode) -> TokenLogprob:
    """``token``'s log-probability under the model's own distribution (the raw logits (1, vocab): before any
    penalty or warper), with the ``alternatives`` most likely tokens; ``decode(id)`` is a token's text."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)[0]
    top = ()
    if alternatives:
        values, ids = torch.topk(logprobs, alternatives)
        top = tuple(TopLogprob(int(i), decode(int(i)), float(v)) for v, i in zip(values, ids))
    return TokenLogprob(token, decode(token), float(logprobs[token]), top)


def _warpers(sampling: Sampling) -> LogitsProcessorList:
    if sampling.greedy:
        return LogitsProcessorList()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if 0 < sampling.top_p < 1:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers
