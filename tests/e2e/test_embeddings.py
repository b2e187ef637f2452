"""Embed through a mesh started by `nlpmesh up` (TLS, API keys): the vectors equal sentence-transformers' for the
same model, through the gateway's gRPC API, nlpmesh-client and the OpenAI edge (the official `openai` package);
bad texts refused by name before any hop; the key's model scope and quota; one trace across gateway and
embedding replica; concurrent callers sharing forwards."""
from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import openai
import pytest
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from nlpmesh_client import NO_RETRY, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from prometheus_client.parser import text_string_to_metric_families

from meshkit.settings import default_home
from tests.e2e.embeddings import embed_when_ready
from tests.e2e.test_clients import Access, new_key
from tests.e2e.test_openai_edge import edge
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

TEXTS = ["Where is my order 48213? It was due last Tuesday.", "hello",
         "The patient reports mild chest pain after exercise; no history of cardiac events.",
         "Was ist ein Anleihe-Kupon? Erklären Sie es einfach.", "¿Dónde está mi pedido?"]


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers in this process, on the same unpacked folder the replica loads."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_home() / "models" / "minilm"), device="cpu")


@pytest.fixture(scope="module")
def ready(launched):
    access = launched.gateway_access()
    with access.channel() as channel:
        embed_when_ready(gateway_pb2_grpc.GatewayStub(channel), gateway_pb2.EmbedRequest(texts=["ready?"]))
    return launched


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_mesh_gives_sentence_transformers_vectors(ready, reference):
    with Access(ready).client() as client:
        answer = client.embed(TEXTS)
    expected = reference.encode(TEXTS)
    assert answer.model == "minilm" and answer.dimensions == 384 == len(answer.vectors[0])
    assert len(answer.vectors) == len(TEXTS)
    assert cosines(answer.vectors, expected).min() >= 0.999
    assert answer.prompt_tokens == sum(len(reference.tokenizer(text)["input_ids"]) for text in TEXTS)
    assert [t.hop for t in answer.timings] == ["embedding", "total"]
    assert "embedding" in answer.server_timing and answer.trace_id


def test_listed_with_its_task_and_named_by_id_or_name(ready):
    with Access(ready).client() as client:
        models = {m.id: m for m in client.list_models()}
        assert models["minilm"].task == "embedding" and models["minilm"].ready
        assert models["minilm"].context_length == 256  # its token limit per text
        assert models["smollm2"].task == "generation"
        by_name = client.embed(["hello"], model="all-MiniLM-L6-v2")
        assert by_name.model == "minilm"
        with pytest.raises(NotFound, match="generates text"):
            client.embed(["hello"], model="smollm2")
        with pytest.raises(NotFound, match="unknown embedding model"):
            client.embed(["hello"], model="no-such-model")


def test_bad_texts_are_refused_by_name_with_no_hop(ready):
    with Access(ready).client() as client:
        with pytest.raises(InvalidArgument) as none:
            client.embed([])
        with pytest.raises(InvalidArgument) as empty:
            client.embed(["fine", ""])
        with pytest.raises(InvalidArgument) as too_many:
            client.embed(["x"] * 257)
        with pytest.raises(InvalidArgument) as too_long:
            client.embed(["fine", "word " * 400])  # 402 tokens: over the model's 256
    assert none.value.field_violations[0][0] == "texts"
    assert empty.value.field_violations == (("texts[1]", "is empty"),)
    assert too_many.value.field_violations[0][0] == "texts"
    assert too_long.value.field_violations[0][0] == "texts[1]" and "256" in too_long.value.field_violations[0][1]


def test_the_keys_model_scope_and_quota_hold(ready):
    scoped = new_key(ready, "only-smollm2", "--models", "smollm2")
    with scoped.client() as client, pytest.raises(PermissionDenied):
        client.embed(["hello"])
    tight = new_key(ready, "tight-embed", "--rps", "1")
    with tight.client(retry=NO_RETRY) as client, pytest.raises(ResourceExhausted) as refused:
        for _ in range(5):
            client.embed(["hello"], timeout_s=30)
    assert refused.value.retry_after_s is not None


def test_the_openai_edge_serves_embeddings(ready):
    client = edge(ready)
    with Access(ready).client() as grpc_client:
        direct = np.asarray(grpc_client.embed(TEXTS).vectors)
    packed = client.embeddings.create(model="minilm", input=TEXTS)  # the SDK asks for base64 and decodes it
    listed = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, encoding_format="float")
    for answer in (packed, listed):
        assert [item.index for item in answer.data] == list(range(len(TEXTS)))
        assert np.allclose([item.embedding for item in answer.data], direct, atol=1e-6)
        assert answer.model == "minilm" and answer.usage.prompt_tokens == answer.usage.total_tokens > 0
    one = client.embeddings.create(model="minilm", input="hello", encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as tokens:
        client.embeddings.create(model="minilm", input=[[101, 7592, 102]])
    with pytest.raises(openai.BadRequestError) as shortened:
        client.embeddings.create(model="minilm", input="hello", dimensions=64)
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model="minilm", input=["fine", ""])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="smollm2", input="hello")
    assert tokens.value.body["param"] == "input" and shortened.value.body["param"] == "dimensions"
    assert empty.value.body["param"] == "texts[1]"


def test_one_trace_spans_the_gateway_and_the_embedding_replica(ready):
    with Access(ready).client() as client:
        answer = client.embed(["a traced text"])
    traces = ready.home / "run" / "traces"

    def spans(service: str) -> list[dict]:
        path = traces / f"{service}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [span for span in map(json.loads, lines) if answer.trace_id in json.dumps(span)]

    embedding = wait_until(lambda: spans("embedding"), 30, 0.5, what="the embedding replica's spans of the request")
    names = {span["name"] for span in embedding}
    assert "nlpmesh.embedding.v1.EmbeddingService/Embed" in names or any("Embed" in n for n in names), names
    gateway = wait_until(lambda: spans("gateway"), 30, 0.5, what="the gateway's spans of the request")
    assert any(span["name"] == "hop embedding" for span in gateway), {span["name"] for span in gateway}


def metric(ready, name: str) -> float:
    url = f"http://127.0.0.1:{ready.state()['metrics_ports']['embedding']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as page:
        text = page.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name)


def test_concurrent_callers_share_forwards(ready):
    forwards, texts = metric(ready, "nlpmesh_embedding_batch_texts_count"), metric(ready, "nlpmesh_embedding_texts_total")
    with Access(ready).client() as client:
        def calls(worker: int) -> int:
            return sum(len(client.embed([f"caller {worker} asks question {i}: where is order {i}?"]).vectors)
                       for i in range(6))

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            answered = sum(pool.map(calls, range(16)))
        took = time.monotonic() - started
    assert answered == 96
    new_forwards = metric(ready, "nlpmesh_embedding_batch_texts_count") - forwards
    assert metric(ready, "nlpmesh_embedding_texts_total") - texts == 96
    assert new_forwards < 96, f"{new_forwards:.0f} forwards for 96 concurrent texts in {took:.1f} s: none shared"


def test_an_over_budget_call_names_the_embedding_hop(ready):
    access = ready.gateway_access()
    with access.channel() as channel, pytest.raises(grpc.RpcError) as late:
        gateway_pb2_grpc.GatewayStub(channel).Embed(gateway_pb2.EmbedRequest(texts=["word " * 250] * 256, budget_ms=1),
                                                    timeout=30)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "embedding" in late.value.details()
