"""One request's decoding state: its KV cache, sampler, text stream and tokens.

``step`` runs one forward pass (the whole prompt the first time, then one token)
and returns the text that became safe to emit. Each sequence owns its cache and
runs at batch size 1, so its tokens do not depend on what else is running.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer
from transformers import DynamicCache, PreTrainedModel

from services.inference.generation import FinishReason, GenerationRequest
from services.inference.sampling import TokenSampler
from services.inference.text_stream import TextStream


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        eos_ids: frozenset[int],
    ):
        self.request = request
        self.generated: list[int] = []
        self.finish_reason: FinishReason | None = None
        self._model = model
        self._eos_ids = eos_ids
        self._cache: DynamicCache | None = DynamicCache(config=model.config)
        self._sampler = TokenSampler(request.sampling)
        self._text = TextStream(tokenizer, request.sampling.stop)
        self._token_ids = list(request.prompt_token_ids)  # prompt + generated, for the sampler
        self._next_input = list(request.prompt_token_ids)

    def step(self) -> str:
        """Generates one token; returns the text it released. Call under inference_mode."""
        logits = self._forward(self._next_input)
        token = self._sampler(self._token_ids, logits)
        self.generated.append(token)
        self._token_ids.append(token)
        self._next_input = [token]
        if token in self._eos_ids:
            return self._finish(FinishReason.STOP, self._text.finish())
        text = self._text.push(token)
        if self._text.stopped:
            return self._finish(FinishReason.STOP_SEQUENCE, text)
        if len(self.generated) >= self.request.sampling.max_new_tokens:
            return self._finish(FinishReason.LENGTH, text + self._text.finish())
        return text

    def _forward(self, input_ids: list[int]) -> torch.Tensor:
        output = self._model(
            input_ids=torch.tensor([input_ids]), cache=self._cache, use_cache=True, logits_to_keep=1
        )
        return output.logits[:, -1, :].float()  # sampling works in float32 whatever the weights' precision

    def _finish(self, reason: FinishReason, text: str) -> str:
        self.finish_reason = reason
        self._cache = None  # the KV cache is the big part: free it now
        return text
