"""llama.cpp as an optional side-by-side baseline (issue 12): the package's own Q4_1 GGUF, same prompts.

Runs only where ``llama-cpp-python`` is installed. It builds llama.cpp from
source (about 7 minutes on 2 cores), so it is not part of ``make setup``:

    .venv/bin/pip install llama-cpp-python==0.3.36

Measured in this process, interleaved with the engine's rounds: one stream's
decode tok/s (greedy, from its first token to its last, the prompt's
evaluation excluded, as the engine's steady window excludes its prefill) and
the time to first token of a prompt (its evaluation and one sampled token).
"""
from __future__ import annotations

import importlib.util
import time

from modelfiles.convert import gguf_path


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCpp:
    def __init__(self, threads: int, context: int = 2048):
        from llama_cpp import Llama

        self.model_path = gguf_path()
        self._llama = Llama(model_path=str(self.model_path), n_threads=threads, n_threads_batch=threads,
                            n_ctx=context, n_batch=512, verbose=False)

    def _tokens(self, prompt: list[int], max_new_tokens: int) -> list[float]:
        """Greedy generation from ``prompt`` (token ids, the same vocabulary as the engine's
        tokenizer); the time each token came, counted from the call."""
        self._llama.reset()  # no KV kept from the last call: every prompt is evaluated cold
        started = time.perf_counter()
        arrivals = []
        for token in self._llama.generate(prompt, temp=0.0, top_k=1, reset=True):
            arrivals.append(time.perf_counter() - started)
            if len(arrivals) >= max_new_tokens or token == self._llama.token_eos():
                break
        return arrivals

    def decode_tok_s(self, prompt: list[int], max_new_tokens: int) -> float:
        arrivals = self._tokens(prompt, max_new_tokens)
        if len(arrivals) < 2:
            raise RuntimeError("llama.cpp ended after one token: raise --max-new-tokens or change the prompt")
        return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])

    def first_token_ms(self, prompt: list[int]) -> float:
        return self._tokens(prompt, 1)[0] * 1000
