"""The engine's stream items as the inference service's GenerateChunk: one mapping for the built-in engine's
servicer and the external engines' adapter (this module imports no torch)."""
from __future__ import annotations

from collections.abc import Iterable

from nlpmesh.inference.v1 import inference_pb2

from services.inference.generation_types import Delta, Finished, TokenLogprob


def chunk_to_pb(item: Delta | Finished) -> inference_pb2.GenerateChunk:
    if isinstance(item, Delta):
        return inference_pb2.GenerateChunk(delta=item.text, logprobs=logprobs_to_pb(item.logprobs))
    return inference_pb2.GenerateChunk(done=True, finish_reason=int(item.finish_reason),
                                       prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens,
                                       logprobs=logprobs_to_pb(item.logprobs))


def logprobs_to_pb(logprobs: Iterable[TokenLogprob]) -> list[inference_pb2.TokenLogprob]:
    return [inference_pb2.TokenLogprob(
        token_id=one.token_id, token=one.token, logprob=one.logprob,
        top=[inference_pb2.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in one.top])
        for one in logprobs]
