"""Embed through the gateway: which embedding model answers, the texts checked, one hop to its replicas.

The embedding replicas (NLPMESH_GATEWAY_EMBEDDING_ADDR; services/embedding) serve one catalogue model, learnt
from their ModelInfo in the background: until they answered, Embed is UNAVAILABLE, and a mesh without them
answers NOT_FOUND. A request names the model by its catalogue id or name, or leaves it empty. Texts are
checked here, before any hop (count, emptiness, characters); the replica holds each to the model's token limit.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from nlpmesh.embedding.v1 import embedding_pb2
from nlpmesh.gateway.v1 import gateway_pb2

from gateway.downstream import Downstream
from gateway.hop import Hop
from gateway.scope import RequestScope
from meshkit.embed_texts import check_texts
from meshkit.errors import MeshError, NotFound, Unavailable
from modelfiles.catalogue import Catalogue

log = logging.getLogger("nlpmesh.gateway.embedding")
_RETRY_S = 0.5


@dataclass(frozen=True)
class EmbeddingModel:
    id: str
    revision: str
    dimensions: int
    max_tokens: int


@dataclass(frozen=True)
class Embedded:
    response: gateway_pb2.EmbedResponse  # the vectors, model and dimensions, as the caller gets them
    model: str
    prompt_tokens: int


class EmbeddingRoute:
    def __init__(self, downstream: Downstream, catalogue: Catalogue, settings):
        self._downstream = downstream
        self._settings = settings
        self._names = {model.name: model.id for model in catalogue.models if model.task == "embedding"}
        self._generative = set(catalogue.ids)
        self.model: EmbeddingModel | None = None
        self._learning: asyncio.Task | None = None

    @property
    def configured(self) -> bool:
        return bool(self._settings.embedding_addr)

    def start(self) -> None:
        """Asks the replicas what they serve until they answer (in the background)."""
        if self.configured:
            self._learning = asyncio.get_running_loop().create_task(self._learn())

    async def close(self) -> None:
        if self._learning is not None:
            self._learning.cancel()
            await asyncio.gather(self._learning, return_exceptions=True)

    def model_id(self, requested: str) -> str:
        """The catalogue id ``requested`` names (empty: the served one). NOT_FOUND for a model that does not
        embed or that this mesh does not serve; UNAVAILABLE while the replicas have not answered."""
        if not self.configured:
            raise NotFound("this mesh serves no embedding model")
        wanted = self._names.get(requested, requested)
        if wanted in self._generative:
            raise NotFound(f"model {requested!r} generates text; Embed needs an embedding model")
        if self.model is None:
            raise Unavailable("the embedding model is not ready yet")
        if wanted and wanted != self.model.id:
            raise NotFound(f"unknown embedding model {requested!r}; this mesh embeds with {self.model.id}")
        return self.model.id

    def check_texts(self, texts) -> None:
        """INVALID_ARGUMENT, naming each bad ``texts[i]``, before any hop."""
        check_texts(texts, self._settings.embed_max_texts, self._settings.embed_max_text_chars)

    async def embed(self, texts: list[str], model_id: str, scope: RequestScope) -> Embedded:
        with scope.hop(Hop.EMBEDDING) as call:
            reply = await self._downstream.embed(texts, model_id, call.timeout_s, call.metadata)
        await scope.quota_lease.record_tokens(reply.prompt_tokens)
        return Embedded(_as_gateway_response(reply), reply.model, reply.prompt_tokens)

    async def _learn(self) -> None:
        said = None
        while True:
            try:
                info = await self._downstream.embedding_info(self._settings.inference_timeout_s)
            except MeshError as error:
                if str(error) != said:
                    said = str(error)
                    log.info("embedding model not ready yet: %s", said)
                await asyncio.sleep(_RETRY_S)
                continue
            self.model = EmbeddingModel(info.model, info.revision, info.dimensions, info.max_tokens)
            log.info("embedding model %s ready (revision %s, %d dimensions)", info.model, info.revision,
                     info.dimensions)
            return


def _as_gateway_response(reply: embedding_pb2.EmbedResponse) -> gateway_pb2.EmbedResponse:
    """The replica's vectors, model and dimensions as the gateway's response, without unpacking the floats:
    fields 1-3 of the two messages have the same numbers and types (tests/unit/test_embedding_units.py), so
    the bytes parse as they are; the replica's prompt_tokens (4) goes into usage instead."""
    tokens = reply.prompt_tokens
    reply.ClearField("prompt_tokens")
    response = gateway_pb2.EmbedResponse.FromString(reply.SerializeToString())
    reply.prompt_tokens = tokens
    return response
