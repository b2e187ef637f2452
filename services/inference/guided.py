"""Guided decoding: a request's ResponseFormat as a token mask on its row's logits, with llguidance.

llguidance compiles the format (a JSON Schema, a regex, a choice list) into a matcher over this model's
vocabulary; at each step the matcher says which tokens may come next, as a bitmask the row's logits are
masked with before its token is chosen, and it then consumes the token chosen. It runs on the engine's
worker, beside the forward, per row: a free row beside a constrained one is never touched.

Compiled matchers are kept by the format's hash in a bounded LRU (``max_grammars``); each request takes a
copy (``deep_copy``, microseconds) in the state of no token consumed. llguidance over xgrammar: both
compile a 20-field schema in about a millisecond on this CPU, but xgrammar's wheel pulls triton (hundreds of
MB, for GPU kernels the CPU path never runs) into every image; llguidance is one Rust extension with no
dependency (docs/engine.md, "Guided decoding").
"""
from __future__ import annotations

import collections
import hashlib
import threading

import llguidance
import llguidance.hf
import llguidance.torch as llguidance_torch
import torch
from transformers import PreTrainedTokenizerBase

from meshkit.errors import InvalidArgument
from meshkit.response_format import ResponseFormat
from services.inference import metrics

# Bit b of a 32-bit word of llguidance's bitmask is token 32 * word + b (1: allowed). int32's top bit is its sign.
_BITS = torch.tensor([1 << b if b < 31 else -(1 << 31) for b in range(32)], dtype=torch.int32)


class Guide:
    """One request's constraint: masks its row's logits, then follows the tokens chosen."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._matcher = matcher
        self._bitmask = torch.full(llguidance_torch.get_bitmask_shape(1, vocab_size), -1, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (1, vocab) with every token the format forbids next at -inf. Plain torch: llguidance's own
        apply_token_bitmask_inplace is a torch.compile kernel, which would compile C++ at the first request."""
        llguidance_torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        allowed = ((self._bitmask.unsqueeze(-1) & _BITS) != 0).flatten(1)
        vocab = logits.shape[-1]
        if allowed.shape[1] < vocab:  # the model's rows past the tokenizer's vocabulary are never allowed
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
        return logits.masked_fill(~allowed[:, :vocab], float("-inf"))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"guided decoding: the matcher refused a token it allowed ({self._matcher.get_error()})")

    @property
    def complete(self) -> bool:
        """Nothing can follow but the end: the answer is whole."""
        return self._matcher.is_stopped()


class GuidedDecoding:
    """Matchers for one model's vocabulary, compiled once per format (a bounded LRU)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: frozenset[int],
                 max_grammars: int = 64):
        # About half a second for a 49k vocabulary: made once, at the engine's start.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=sorted(eos_ids)[0] if eos_ids else None)
        self._vocab_size = vocab_size
        self._max_grammars = max_grammars
        self._compiled: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()

    def guide(self, response_format: ResponseFormat) -> Guide:
        """A fresh constraint for one request; InvalidArgument naming the field if the format does not compile
        for this vocabulary."""
        key = hashlib.sha256(repr((response_format.kind, response_format.value)).encode()).hexdigest()
        with self._lock:
            matcher = self._compiled.get(key)
            if matcher is not None:
                self._compiled.move_to_end(key)
                metrics.GRAMMARS.labels("hit").inc()
        if matcher is None:
            matcher = llguidance.LLMatcher(self._tokenizer, response_format.grammar())
            if matcher.is_error():
                raise InvalidArgument.for_field(response_format.field, "not supported by guided decoding")
            metrics.GRAMMARS.labels("compiled").inc()
            with self._lock:
                self._compiled[key] = matcher
                while len(self._compiled) > self._max_grammars:
                    self._compiled.popitem(last=False)
        return Guide(matcher.deep_copy(), self._vocab_size)
