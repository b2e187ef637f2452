"""transformers' ``generate`` as a baseline, in a process of its own (``python -m bench.hf_generate``).

The bench's engine runs its forwards on its worker thread, as the inference service
does; ``generate`` in the bench's own threads would keep a second OpenMP team alive
beside the worker's, and with more OpenMP threads than cores libgomp makes both
teams sleep between parallel regions, which slows both (services/inference/threads.py).
So ``generate`` runs here, on the same converted model files in the same precision
(``load_model``: the very weights the engine has), its torch work in this process's
main thread only; one JSON request a line on stdin, one answer a line on stdout.
"""
from __future__ import annotations

import sys
import time

from bench.worker_process import WorkerProcess, serve
from modelfiles.convert import DEFAULT_MODEL


class HfGenerate(WorkerProcess):
    """The client: ``python -m bench.hf_generate`` asked for figures."""

    def __init__(self, dtype: str, threads: int, model: str = DEFAULT_MODEL):
        super().__init__("bench.hf_generate", dtype, str(threads), model)

    def decode_tok_s(self, prompts: list[list[int]], max_new_tokens: int) -> float:
        return self.ask(op="decode_tok_s", prompts=prompts, max_new_tokens=max_new_tokens)

    def first_token_ms(self, prompt: list[int]) -> float:
        return self.ask(op="first_token_ms", prompt=prompt)

    def serve_load(self, requests: list[dict], max_new_tokens: int, limit_s: float) -> dict:
        """Serves requests (``{"at": seconds from now, "prompt": ids}``) as they arrive, batching those that
        have arrived whenever ``generate`` is free (``serve_load`` below)."""
        return self.ask(op="serve_load", requests=requests, max_new_tokens=max_new_tokens, limit_s=limit_s)

    def precision(self) -> str:
        """The precision the weights run in (what ``auto`` chose on this CPU, as the inference service does)."""
        return self.ask(op="precision")


def _serve(dtype: str, threads: int, model_id: str) -> None:
    import torch

    from bench.generation import hf_decode_tok_s, hf_first_token_ms
    from meshkit.settings import default_home
    from modelfiles.catalogue import load_catalogue
    from modelfiles.convert import load_model_files
    from services.inference.loading import load_model
    from services.inference.precision import model_precision

    torch.set_num_threads(threads)
    # The precisions the model's catalogue entry allows, as its inference service is limited to them.
    allowed = load_catalogue().get(model_id).precisions
    model, tokenizer = load_model(load_model_files(default_home(), model_id), dtype, allowed=allowed)
    serve({
        "decode_tok_s": lambda request: hf_decode_tok_s(model, tokenizer, request["prompts"],
                                                         request["max_new_tokens"]),
        "first_token_ms": lambda request: hf_first_token_ms(model, request["prompt"]),
        "serve_load": lambda request: serve_load(model, tokenizer, request["requests"], request["max_new_tokens"],
                                                 request["limit_s"]),
        "precision": lambda request: model_precision(model) or str(model.dtype).removeprefix("torch."),
    })


def serve_load(model, tokenizer, requests: list[dict], max_new_tokens: int, limit_s: float,
               max_batch: int = 8) -> dict:
    """``generate`` as a server that batches what has arrived: whenever it is free, the requests that have
    arrived (at most ``max_batch``, first come first) go as one left-padded batch of ``max_new_tokens`` greedy
    tokens each. Each request's first token is the end of its batch's prefill, its gaps the batch's steps,
    its end the batch's end (``generate`` hands over every token at the end); all from its arrival. A request
    not started within ``limit_s`` is None."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.steps: list[float] = []

        def __call__(self, input_ids, scores):
            self.steps.append(time.perf_counter())
            return scores

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.perf_counter()
    results: list[dict | None] = [None] * len(requests)
    pending = list(range(len(requests)))
    while pending and time.perf_counter() - start < limit_s:
        now = time.perf_counter() - start
        arrived = [index for index in pending if requests[index]["at"] <= now][:max_batch]
        if not arrived:
            time.sleep(min(requests[pending[0]]["at"] - now, 0.05))
            continue
        prompts = [requests[index]["prompt"] for index in arrived]
        width = max(len(prompt) for prompt in prompts)
        ids = torch.tensor([[pad] * (width - len(prompt)) + prompt for prompt in prompts])
        mask = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts])
        clock = Clock()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([clock]),
                           pad_token_id=pad)
        end = time.perf_counter()
        for index in arrived:
            arrival = start + requests[index]["at"]
            results[index] = {"ttft_s": clock.steps[0] - arrival, "e2e_s": end - arrival, "tokens": max_new_tokens,
                              "gaps_s": [b - a for a, b in zip(clock.steps, clock.steps[1:])]}
            pending.remove(index)
    return {"requests": results, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
