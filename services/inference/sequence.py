"""One request's decoding state: its sampler, text stream and tokens.

The engine runs the model (a batch at a time) and hands each sequence the
logits of its last position; ``accept`` picks the next token and returns the
text that became safe to emit. ``length`` counts the tokens whose KV the
sequence's row holds; ``next_token`` is what the next decode step feeds in.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer

from services.inference.generation_types import FinishReason, GenerationRequest, TokenLogprob
from services.inference.guided import Guide
from services.inference.sampling import TokenSampler, token_logprob
from services.inference.text_stream import TextStream


class Sequence:
    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer, eos_ids: frozenset[int],
                 guide: Guide | None = None):
        self.request = request
        self.generated: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.length = 0  # tokens held in the KV row
        self._eos_ids = eos_ids
        self._sampler = TokenSampler(request.sampling)
        self._text = TextStream(tokenizer, request.sampling.stop)
        self._token_ids = list(request.prompt_token_ids)  # prompt + generated, for the sampler
        self._tokenizer = tokenizer
        self._logprobs: list[TokenLogprob] = []  # Sampling.logprobs set: those not yet taken (``take_logprobs``)
        self._guide = guide  # Sampling.response_format set: the token mask that keeps the answer to it

    @property
    def next_token(self) -> int:
        return self._token_ids[-1]

    def accept(self, logits: torch.Tensor) -> str:
        """Takes the next token from the last position's logits (1, vocab); returns the text it released."""
        logits = logits.float()  # sampling works in float32
        allowed = self._guide.mask(logits) if self._guide is not None else logits
        token = self._sampler(self._token_ids, allowed, len(self.request.prompt_token_ids))
        alternatives = self.request.sampling.logprobs
        if alternatives is not None:  # the model's own distribution, before the mask
            self._logprobs.append(token_logprob(logits, token, alternatives, self._decode_one))
        self.generated.append(token)
        self._token_ids.append(token)
        if token in self._eos_ids:
            return self._finish(FinishReason.STOP, self._text.finish())
        if self._guide is not None:
            self._guide.advance(token)
            if self._guide.complete:  # the format allows nothing more: the answer is whole
                return self._finish(FinishReason.STOP, self._text.push(token) + self._text.finish())
        text = self._text.push(token)
        if self._text.stopped:
            return self._finish(FinishReason.STOP_SEQUENCE, text)
        if len(self.generated) >= self.request.sampling.max_new_tokens:
            return self._finish(FinishReason.LENGTH, text + self._text.finish())
        return text

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The log-probabilities of the tokens accepted since the last call (none unless asked for)."""
        taken, self._logprobs = tuple(self._logprobs), []
        return taken

    def _decode_one(self, token: int) -> str:
        return self._tokenizer.decode([token], skip_special_tokens=False)

    def _finish(self, reason: FinishReason, text: str) -> str:
        self.finish_reason = reason
        return text
