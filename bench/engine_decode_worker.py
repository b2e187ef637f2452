"""The engine of a given checkout, in a process of its own, streaming greedy requests for the bench.

``python -m bench.run --baseline-tree <checkout>`` compares this tree's decode speed
with another checkout's (the tree before a change) in one run, rounds interleaved.
This file is run by path with that checkout as the working directory and first on
``PYTHONPATH`` (bench/engine_speed.py, ``EngineOfTree``), so every package it
imports is that checkout's: it therefore uses only what the engine has long had
(``Engine``, ``load_model``, ``InferenceSettings``, the request types) and nothing
from ``bench``. One JSON request a line on stdin, one answer a line on stdout
(``{"value": ...}`` or ``{"error": ...}``), as bench/worker_process.py has it.

Requests: ``{"op": "describe"}`` -> the precision chosen; ``{"op": "streams", "prompts":
[[ids]], "max_new_tokens": n}`` -> for each prompt, run concurrently, its text arrival
times (perf_counter) and its completion tokens: the bench turns them into tok/s as it
does for its own engine.
"""
from __future__ import annotations

import asyncio
import json
import sys
import threading
import time


def in_thread_that_ends(work):
    """``work()`` in a thread that ends with it (its OpenMP team goes too: services/inference/threads.py)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as error:  # raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="bench-load")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def main() -> None:
    answers = sys.stdout
    sys.stdout = sys.stderr  # whatever the checkout prints stays off the answer channel
    import torch

    from meshkit.sampling import Sampling
    from meshkit.settings import default_home
    from modelfiles.convert import load_model_files
    from services.inference.engine import Engine
    from services.inference.generation_types import Delta, GenerationRequest
    from services.inference.loading import load_model
    from services.inference.precision import model_precision
    from services.inference.settings import InferenceSettings

    settings = InferenceSettings()
    torch.set_num_threads(settings.threads)
    model, tokenizer = in_thread_that_ends(lambda: load_model(load_model_files(default_home()), settings.dtype))
    engine = Engine(model, tokenizer, settings.engine_options())

    def streams(prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[float], int]]:
        async def one(prompt: list[int]) -> tuple[list[float], int]:
            arrivals, tokens = [], 0
            stream = engine.submit(GenerationRequest(prompt, Sampling(max_new_tokens=max_new_tokens)))
            async for item in stream:
                if isinstance(item, Delta):
                    arrivals.append(time.perf_counter())
                else:
                    tokens = item.completion_tokens
            return arrivals, tokens

        async def run():
            return await asyncio.gather(*(one(prompt) for prompt in prompts))

        return asyncio.run(run())

    handlers = {
        "describe": lambda request: model_precision(model),
        "streams": lambda request: streams(request["prompts"], request["max_new_tokens"]),
    }
    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                answer = {"value": handlers[request["op"]](request)}
            except Exception as error:  # reported to the bench, which stops with it
                answer = {"error": f"{type(error).__name__}: {error}"}
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
    finally:
        engine.close()


if __name__ == "__main__":
    main()
