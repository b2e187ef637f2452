"""gRPC edge of the embedding service: checks the texts, tokenizes them, queues them for a shared forward.

One process serves one embedding model of the catalogue (NLPMESH_EMBEDDING_MODEL; empty = the first entry with
task = "embedding"). Texts are checked before they queue: none empty, at most ``max_texts``, each within the
model's token limit (INVALID_ARGUMENT naming ``texts[i]``), so a forward never fails for one caller's input.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from nlpmesh.embedding.v1 import embedding_pb2, embedding_pb2_grpc

from meshkit import span_names
from meshkit.cpu_features import read_cpu_features
from meshkit.embed_texts import check_texts
from meshkit.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from meshkit.server import ServiceSpec, rpc_method
from meshkit.tracing.provider import tracer
from modelfiles.catalogue import CatalogueModel, load_catalogue
from modelfiles.convert import load_model_files
from services.embedding.batching import EmbeddingQueue, torch_worker
from services.embedding.encoder import SentenceEncoder, TextTooLong
from services.embedding.settings import EmbeddingSettings

SERVICE_NAME = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name

log = logging.getLogger("nlpmesh.embedding")
_tracer = tracer("embedding")
_INLINE_TOKENIZE_CHARS = 8192  # requests up to this many characters are tokenized on the event loop (~2 ms)


def served_model(settings: EmbeddingSettings) -> CatalogueModel:
    catalogue = load_catalogue()
    if not settings.model:
        if not catalogue.embedding_ids:
            raise ValueError(f"the catalogue ({catalogue.path}) has no entry with task = \"embedding\"")
        return catalogue.get(catalogue.embedding_ids[0])
    model = catalogue.get(settings.model)
    if model.task != "embedding":
        raise ValueError(f"NLPMESH_EMBEDDING_MODEL={settings.model!r} is not an embedding model "
                         f"(the catalogue's: {', '.join(catalogue.embedding_ids) or 'none'})")
    return model


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, settings: EmbeddingSettings, model: CatalogueModel):
        self._settings = settings
        self._model = model
        self._encoder: SentenceEncoder | None = None
        self._queue: EmbeddingQueue | None = None
        self._revision = ""

    async def warm_up(self) -> None:
        files = load_model_files(self._settings.home, self._model.id)
        settings = self._settings
        loop = asyncio.get_running_loop()
        worker = torch_worker()
        self._encoder = await loop.run_in_executor(worker, SentenceEncoder, files.path, self._model.max_tokens,
                                                   settings.max_batch_texts, settings.threads, settings.precision)
        await loop.run_in_executor(worker, self._encoder.embed, self._encoder.tokenize(["warm-up"]))
        self._queue = EmbeddingQueue(self._encoder.embed, worker, settings.max_batch_texts,
                                     settings.max_queued_texts, _tracer)
        self._queue.start()
        self._revision = files.revision
        log.info("embedding model %s ready: %d dimensions, at most %d tokens a text, %s through %s on %d threads "
                 "(%s)", self._model.id, self._encoder.dimensions, self._encoder.max_tokens, self._encoder.precision,
                 self._encoder.forward_path, self._encoder.threads, read_cpu_features().summary())

    async def close(self) -> None:
        if self._queue is not None:
            await self._queue.close()

    @rpc_method
    async def Embed(self, request, context) -> embedding_pb2.EmbedResponse:
        encoder, queue = self._ready()
        if request.model and request.model not in (self._model.id, self._model.name):
            raise NotFound(f"no embedding model {request.model!r}; this replica serves {self._model.id}")
        texts = list(request.texts)
        check_texts(texts, self._settings.max_texts)
        try:
            # The Rust tokenizer takes microseconds for a few short texts: a thread's hand-off would cost more.
            inline = sum(len(text) for text in texts) <= _INLINE_TOKENIZE_CHARS
            ids = encoder.tokenize(texts) if inline else await asyncio.to_thread(encoder.tokenize, texts)
        except TextTooLong as error:
            raise InvalidArgument(
                f"{len(error.over)} text(s) over the model's {error.limit}-token limit, "
                f"first texts[{error.over[0][0]}] ({error.over[0][1]} tokens)",
                [FieldViolation(f"texts[{index}]", f"{count} tokens; at most {error.limit}")
                 for index, count in error.over]) from None
        prompt_tokens = sum(len(one) for one in ids)
        with _tracer.start_as_current_span("embedding queue") as span:
            span.set_attribute(span_names.TOKEN_COUNT, prompt_tokens)
            vectors = await queue.embed(ids, context.time_remaining())
        return embedding_pb2.EmbedResponse(
            embeddings=[embedding_pb2.Embedding(values=row) for row in vectors.tolist()],
            model=self._model.id, dimensions=encoder.dimensions, prompt_tokens=prompt_tokens)

    @rpc_method
    async def ModelInfo(self, request, context) -> embedding_pb2.ModelInfoResponse:
        encoder, _ = self._ready()
        return embedding_pb2.ModelInfoResponse(model=self._model.id, revision=self._revision,
                                               dimensions=encoder.dimensions, max_tokens=encoder.max_tokens)

    def _ready(self) -> tuple[SentenceEncoder, EmbeddingQueue]:
        if self._encoder is None or self._queue is None:
            raise Unavailable("the embedding model is still loading")
        return self._encoder, self._queue


def build_spec(settings: EmbeddingSettings) -> ServiceSpec:
    servicer = EmbeddingServicer(settings, served_model(settings))

    def register(server: grpc.aio.Server) -> None:
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(servicer, server)

    return ServiceSpec(name="embedding", service_names=(SERVICE_NAME,), register=register,
                       warm_up=servicer.warm_up, close=servicer.close)
