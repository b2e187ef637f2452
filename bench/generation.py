"""Time to first token and decode rate: through the mesh, and the same engine in-process."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from services.inference.engine import Engine
from services.inference.generation import Delta, Finished, GenerationRequest, SamplingConfig


@dataclass(frozen=True)
class GenerationSample:
    ttft_s: float
    tokens: int
    decode_tok_s: float  # tokens after the first, over the time after the first


def through_gateway(stub, request) -> GenerationSample:
    started = time.perf_counter()
    first = last = None
    final = None
    for chunk in stub.GenerateStream(request, timeout=300):
        now = time.perf_counter()
        if chunk.delta:
            first = first or now
            last = now
        if chunk.done:
            final = chunk
    return _sample(started, first, last, final.usage.completion_tokens)


def in_process(engine: Engine, prompt_ids: list[int], max_new_tokens: int) -> GenerationSample:
    async def run():
        started = time.perf_counter()
        first = last = None
        tokens = 0
        stream = engine.submit(GenerationRequest(prompt_ids, SamplingConfig(max_new_tokens=max_new_tokens)))
        async with stream:
            async for item in stream:
                now = time.perf_counter()
                if isinstance(item, Delta) and item.text:
                    first = first or now
                    last = now
                elif isinstance(item, Finished):
                    tokens = item.completion_tokens
        return _sample(started, first, last, tokens)

    return asyncio.run(run())


def _sample(started: float, first: float, last: float, tokens: int) -> GenerationSample:
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return GenerationSample(first - started, tokens, decode)
