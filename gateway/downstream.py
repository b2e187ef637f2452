"""Clients for the internal services: template, tokenizer and cache here, inference per model
(gateway/inference_pool.py).

Every call carries a finite deadline and the trace context; a failure comes
back as the domain error the caller should see (meshkit.errors.from_rpc_error).
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2
from nlpmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from nlpmesh.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from nlpmesh.template.v1 import template_pb2, template_pb2_grpc
from nlpmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from gateway import balancing
from gateway.channels import open_channel
from gateway.hop import Hop
from gateway.inference_pool import InferencePool
from gateway.request import Chat, TemplateCall
from meshkit.errors import from_rpc_error
from meshkit.response_format import ResponseFormat
from meshkit.tls import TlsConfig
from promptcache.keys import PromptCacheKey
from promptcache.redis_tier import CachedAnswer

log = logging.getLogger("nlpmesh.gateway.downstream")


@dataclass(frozen=True)
class RenderedPrompt:
    version: str
    messages: tuple[tuple[str, str], ...]
    response_format: ResponseFormat | None = None  # the version's own, if it declares one


@dataclass(frozen=True)
class TemplateEntry:
    id: str
    version: str
    description: str
    variables: tuple[tuple[str, bool, str], ...]  # (name, required, description)
    newest: bool
    response_format: ResponseFormat | None = None


@asynccontextmanager
async def _hop(hop: Hop):
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, hop) from None


class Downstream:
    """Channels and stubs to template, tokenizer and cache, and to each model's inference replicas
    (``pools``, gateway/inference_pool.py)."""

    def __init__(self, settings, pools: list[InferencePool] | None = None, longest_call_s: float = 600.0):
        self._settings = settings
        # Channels replaced by new TLS files stay open this long for the calls already on them: the longest a
        # request may last (gateway/budgets.py), so none is cut short.
        self._retire_grace_s = longest_call_s
        self.pools = pools if pools is not None else [InferencePool(settings)]
        self._channels: list[grpc.aio.Channel] = []
        self._by_service: dict[str, grpc.aio.Channel] = {}
        # mTLS to the internal services when the mesh CA is configured; read again when its files change.
        self._tls = TlsConfig.from_settings(settings)
        self._tls_digest = self._tls.files_digest()
        self._credentials = self._tls.channel_credentials()
        self._tls_follower: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()

    async def open(self) -> None:
        self._open_stubs()
        for pool in self.pools:
            await pool.open()
        if self._credentials is not None and self._settings.tls_reload_s > 0:
            self._tls_follower = asyncio.get_running_loop().create_task(self._follow_tls())

    def _open_stubs(self) -> None:
        s = self._settings
        self.template = template_pb2_grpc.TemplateServiceStub(
            self._channel("template", s.template_addr, balancing.TEMPLATE_SERVICE))
        self.tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(
            self._channel("tokenizer", s.tokenizer_addr, balancing.TOKENIZER_SERVICE))
        self.cache = cache_pb2_grpc.CacheServiceStub(self._channel("cache", s.cache_addr, balancing.CACHE_SERVICE))
        self.embedding = embedding_pb2_grpc.EmbeddingServiceStub(
            self._channel("embedding", s.embedding_addr, balancing.EMBEDDING_SERVICE)) if s.embedding_addr else None

    async def _follow_tls(self) -> None:
        """Every ``tls_reload_s``: when the CA bundle, certificate or key changed, new channels with them."""
        while True:
            await asyncio.sleep(self._settings.tls_reload_s)
            try:
                digest = self._tls.files_digest()
                if digest != self._tls_digest:
                    self.reconnect(self._tls.channel_credentials())
                    self._tls_digest = digest
                    log.info("TLS files changed: new channels to the internal services with them")
            except (OSError, ValueError) as error:  # a file half written: the next round reads it again
                log.warning("TLS files changed but could not be read (%s); the current channels stay",
                            type(error).__name__)

    def reconnect(self, credentials: grpc.ChannelCredentials | None) -> None:
        """New channels with ``credentials`` to every internal service; calls in flight finish on the old
        channels, which close once those calls are done."""
        old, self._channels = self._channels, []
        self._credentials = credentials
        self._open_stubs()
        for pool in self.pools:
            pool.reconnect(credentials, self._retire_grace_s)
        for channel in old:
            retire = asyncio.get_running_loop().create_task(channel.close(grace=self._retire_grace_s))
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)

    def _channel(self, name: str, address: str, service: str) -> grpc.aio.Channel:
        """One channel over every replica at ``address``, balanced and retried by its service config
        (gateway/balancing.py)."""
        # Under TLS a list of endpoints has no one host name to check: each replica's certificate is checked
        # against the service's name (``nlpmesh certs init`` issues it with that name).
        listed = len(balancing.endpoints(address)) > 1
        channel = open_channel(self._settings, self._credentials, balancing.grpc_target(address), service,
                               name if listed else None)
        self._channels.append(channel)
        self._by_service[name] = channel
        return channel

    def required_channels(self) -> dict[str, grpc.aio.Channel]:
        """The channels every generation needs, by service name: template and tokenizer. (Inference is
        per model: each pool's own. Not the cache service: without it answers are not stored, but the mesh
        still answers.)"""
        return {name: self._by_service[name] for name in ("template", "tokenizer")}

    async def connected(self, timeout_s: float) -> None:
        """Waits until template and tokenizer are connected, so the first request pays no handshake."""
        self._by_service["cache"].get_state(try_to_connect=True)
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self.required_channels().values())),
                               timeout_s)

    async def close(self) -> None:
        if self._tls_follower is not None:
            self._tls_follower.cancel()
        for pool in self.pools:
            await pool.close()
        for channel in self._channels:
            await channel.close()
        for retire in list(self._retiring):
            retire.cancel()

    async def render(self, call: TemplateCall, timeout: float, metadata=()) -> RenderedPrompt:
        variables = struct_pb2.Struct()
        variables.update(call.variables)
        request = template_pb2.RenderRequest(id=call.id, version=call.version, variables=variables)
        async with _hop(Hop.TEMPLATE):
            reply = await self.template.Render(request, timeout=timeout, metadata=metadata)
        return RenderedPrompt(reply.version, tuple((m.role, m.content) for m in reply.messages),
                              ResponseFormat.from_pb(reply.response_format))

    async def list_templates(self, timeout: float, metadata=()) -> list[TemplateEntry]:
        async with _hop(Hop.TEMPLATE):
            reply = await self.template.ListTemplates(
                template_pb2.ListTemplatesRequest(), timeout=timeout, metadata=metadata
            )
        return [
            TemplateEntry(
                t.id, t.version, t.description,
                tuple((v.name, v.required, v.description) for v in t.variables), t.newest,
                ResponseFormat.from_pb(t.response_format),
            )
            for t in reply.templates
        ]

    async def embed(self, texts: list[str], model: str, timeout: float, metadata=()) -> embedding_pb2.EmbedResponse:
        async with _hop(Hop.EMBEDDING):
            return await self.embedding.Embed(embedding_pb2.EmbedRequest(model=model, texts=texts), timeout=timeout,
                                              metadata=metadata)

    async def embedding_info(self, timeout: float) -> embedding_pb2.ModelInfoResponse:
        async with _hop(Hop.EMBEDDING):
            return await self.embedding.ModelInfo(embedding_pb2.ModelInfoRequest(), timeout=timeout,
                                                  wait_for_ready=True)

    async def encode_chat(self, chat: Chat, model: str, timeout: float, metadata=()) -> list[int]:
        async with _hop(Hop.TOKENIZER):
            reply = await self.tokenizer.EncodeChat(_chat_to_pb(chat, model), timeout=timeout, metadata=metadata)
        return list(reply.token_ids)

    async def count_chat(self, chat: Chat, model: str, timeout: float, metadata=()) -> int:
        async with _hop(Hop.TOKENIZER):
            reply = await self.tokenizer.CountChat(_chat_to_pb(chat, model), timeout=timeout, metadata=metadata)
        return reply.count

    async def store(self, key: PromptCacheKey, answer: CachedAnswer, timeout: float, metadata=()) -> bool:
        request = cache_pb2.StoreRequest(key=key.to_pb(), answer=answer.to_pb())
        async with _hop(Hop.CACHE):
            reply = await self.cache.Store(request, timeout=timeout, metadata=metadata)
        return reply.stored


def _chat_to_pb(chat: Chat, model: str) -> tokenizer_pb2.EncodeChatRequest:
    return tokenizer_pb2.EncodeChatRequest(
        model=model, messages=[tokenizer_pb2.Message(role=r, content=c) for r, c in chat.messages]
    )
