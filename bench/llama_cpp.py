"""llama.cpp as an optional side-by-side baseline (issue 12): the package's own Q4_1 GGUF, same prompts.

Runs only where ``llama-cpp-python`` is installed. It builds llama.cpp from
source (about 7 minutes on 2 cores), so it is not part of ``make setup``:

    .venv/bin/pip install llama-cpp-python==0.3.36

llama.cpp runs in a process of its own (``python -m bench.llama_cpp``, one JSON
request a line on stdin, one answer a line on stdout), idle between its turns:
in the bench's process its worker threads would share the CPU and the OpenMP
runtime with torch's, and slow both. Measured, interleaved with the engine's
rounds: one stream's decode tok/s (greedy, from its first token to its last, the
prompt's evaluation excluded, as the engine's steady window excludes its
prefill) and the time to first token of a prompt (its evaluation and one sampled
token).
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

from bench.worker_process import WorkerProcess, serve
from modelfiles.catalogue import load_catalogue
from modelfiles.convert import DEFAULT_MODEL
from modelfiles.sources import locate


def available(model: str = DEFAULT_MODEL) -> bool:
    """Whether llama.cpp is installed and can open ``model``'s GGUF as one file."""
    return importlib.util.find_spec("llama_cpp") is not None and gguf_path(model) is not None


def gguf_path(model: str = DEFAULT_MODEL) -> Path | None:
    """The catalogue model's GGUF file; None where it is not one GGUF file (an HF folder, or a GGUF split
    over several packages' chunks, which llama.cpp cannot open as they are)."""
    parts = locate(load_catalogue().get(model)).gguf_parts
    return parts[0] if len(parts) == 1 else None


class LlamaCpp(WorkerProcess):
    """The client: ``python -m bench.llama_cpp`` asked for figures."""

    def __init__(self, threads: int, model: str = DEFAULT_MODEL):
        self.model_path = gguf_path(model)
        super().__init__("bench.llama_cpp", "--threads", str(threads), "--model", model)

    def decode_tok_s(self, prompt: list[int], max_new_tokens: int) -> float:
        return self.ask(op="decode_tok_s", prompt=prompt, max_new_tokens=max_new_tokens)

    def first_token_ms(self, prompt: list[int]) -> float:
        return self.ask(op="first_token_ms", prompt=prompt)


def _arrivals(llama, prompt: list[int], max_new_tokens: int) -> list[float]:
    """Greedy generation from ``prompt`` (token ids, the same vocabulary as the engine's tokenizer),
    evaluated cold; the time each token came, counted from the call."""
    llama.reset()
    started = time.perf_counter()
    arrivals = []
    for token in llama.generate(prompt, temp=0.0, top_k=1, reset=True):
        arrivals.append(time.perf_counter() - started)
        if len(arrivals) >= max_new_tokens or token == llama.token_eos():
            break
    return arrivals


def _decode_tok_s(llama, request: dict) -> float:
    arrivals = _arrivals(llama, request["prompt"], request["max_new_tokens"])
    if len(arrivals) < 2:
        raise ValueError("llama.cpp ended after one token: raise --max-new-tokens")
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


def _serve(threads: int, model: str) -> None:
    from llama_cpp import Llama

    llama = Llama(model_path=str(gguf_path(model)), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                  n_batch=512, verbose=False)
    serve({
        "decode_tok_s": lambda request: _decode_tok_s(llama, request),
        "first_token_ms": lambda request: _arrivals(llama, request["prompt"], 1)[0] * 1000,
    })


if __name__ == "__main__":
    _serve(int(sys.argv[sys.argv.index("--threads") + 1]), sys.argv[sys.argv.index("--model") + 1])
