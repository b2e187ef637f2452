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

    def serve_load(self, requests: list[dict], max_new_tokens: int, limit_s: float) -> dict:
        return self.ask(op="serve_load", requests=requests, max_new_tokens=max_new_tokens, limit_s=limit_s)


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


def serve_load(llama, requests: list[dict], max_new_tokens: int, limit_s: float) -> dict:
    """llama.cpp as a server that answers one request at a time, first come first (llama-cpp-python's server
    runs one generation at a time): each request's first token, gaps and end counted from its arrival
    (``at``, seconds from the start), ``max_new_tokens`` greedy tokens each (fewer where it ends). A request
    not started within ``limit_s`` is None."""
    start = time.perf_counter()
    results: list[dict | None] = [None] * len(requests)
    for index, request in enumerate(requests):
        wait = request["at"] - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        if time.perf_counter() - start >= limit_s:
            break
        arrival = start + request["at"]
        begun = time.perf_counter()
        times = [begun + at for at in _arrivals(llama, request["prompt"], max_new_tokens)]
        results[index] = {"ttft_s": times[0] - arrival, "e2e_s": times[-1] - arrival, "tokens": len(times),
                          "gaps_s": [b - a for a, b in zip(times, times[1:])]}
    return {"requests": results, "seconds": time.perf_counter() - start}


def turn_off_repacking() -> None:
    """llama-cpp-python 0.3.36 repacks q4_1 weights for AMX where the CPU has it, and its batched prefill then
    crashes (SIGSEGV in llama_decode) on any prompt of more than a token or two; without the repack it runs.
    Neither ``Llama`` nor its server has an option for it (llama.cpp's own server has --no-repack), so the
    model's default parameters are changed before a model loads."""
    import llama_cpp.llama_cpp as bindings

    defaults = bindings.llama_model_default_params

    def without_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_repack


def _serve(threads: int, model: str) -> None:
    from llama_cpp import Llama

    turn_off_repacking()
    llama = Llama(model_path=str(gguf_path(model)), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                  n_batch=512, verbose=False)
    serve({
        "decode_tok_s": lambda request: _decode_tok_s(llama, request),
        "first_token_ms": lambda request: _arrivals(llama, request["prompt"], 1)[0] * 1000,
        "serve_load": lambda request: serve_load(llama, request["requests"], request["max_new_tokens"],
                                                 request["limit_s"]),
    })


if __name__ == "__main__":
    _serve(int(sys.argv[sys.argv.index("--threads") + 1]), sys.argv[sys.argv.index("--model") + 1])
