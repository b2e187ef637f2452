"""Clients for the four internal services.

Every call carries a finite deadline and the trace context; a failure comes
back as the domain error the caller should see (meshkit.errors.from_rpc_error).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2
from nlpmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from nlpmesh.template.v1 import template_pb2, template_pb2_grpc
from nlpmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from meshkit.errors import from_rpc_error
from meshkit.sampling import Sampling
from meshkit.server import channel_options
from meshkit.tls import TlsConfig
from promptcache.keys import PromptCacheKey
from promptcache.redis_tier import CachedAnswer
from services.gateway.hop import Hop
from services.gateway.request import Chat, TemplateCall
from services.inference.load_report import InferenceLoad


@dataclass(frozen=True)
class RenderedPrompt:
    version: str
    messages: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class TemplateEntry:
    id: str
    version: str
    description: str
    variables: tuple[tuple[str, bool, str], ...]  # (name, required, description)
    newest: bool


@dataclass(frozen=True)
class ModelInfo:
    model: str
    revision: str
    context_length: int
    default_max_new_tokens: int


@dataclass(frozen=True)
class TokenDelta:
    text: str


@dataclass(frozen=True)
class GenerationEnd:
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int


@asynccontextmanager
async def _hop(hop: Hop):
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, hop) from None


class Downstream:
    """Channels and stubs to template, tokenizer, inference and cache.

    ``on_inference_load`` gets the load report of every inference call
    (services/inference/load_report.py; None when a call carried none);
    ``on_inference_cancel`` is called when this side cancels a generation before its end report.
    """

    def __init__(self, settings, on_inference_load: Callable[[InferenceLoad | None], None] = lambda load: None,
                 on_inference_cancel: Callable[[], None] = lambda: None):
        self._settings = settings
        self._on_inference_load = on_inference_load
        self._on_inference_cancel = on_inference_cancel
        self._channels: list[grpc.aio.Channel] = []
        self._by_address: dict[str, grpc.aio.Channel] = {}
        # mTLS to the internal services when the mesh CA is configured.
        self._credentials = TlsConfig.from_settings(settings).channel_credentials()

    async def open(self) -> None:
        s = self._settings
        self.template = template_pb2_grpc.TemplateServiceStub(self._channel(s.template_addr))
        self.tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(self._channel(s.tokenizer_addr))
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._channel(s.inference_addr))
        self.cache = cache_pb2_grpc.CacheServiceStub(self._channel(s.cache_addr))

    def _channel(self, address: str) -> grpc.aio.Channel:
        # A restarted service is reached again within seconds: gRPC's own reconnect backoff grows to 120 s.
        options = [*channel_options(self._settings.max_message_bytes),
                   ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]
        channel = (grpc.aio.secure_channel(address, self._credentials, options=options) if self._credentials
                   else grpc.aio.insecure_channel(address, options=options))
        self._channels.append(channel)
        self._by_address[address] = channel
        return channel

    def required_channels(self) -> dict[str, grpc.aio.Channel]:
        """The channels a generation needs, by service name.

        Not the cache service: without it answers are not stored, but the mesh still answers.
        """
        s = self._settings
        return {"template": self._by_address[s.template_addr], "tokenizer": self._by_address[s.tokenizer_addr],
                "inference": self._by_address[s.inference_addr]}

    async def connected(self, timeout_s: float) -> None:
        """Waits until the channels a request needs are connected, so the first one pays no handshake."""
        self._by_address[self._settings.cache_addr].get_state(try_to_connect=True)
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self.required_channels().values())),
                               timeout_s)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def render(self, call: TemplateCall, timeout: float, metadata=()) -> RenderedPrompt:
        variables = struct_pb2.Struct()
        variables.update(call.variables)
        request = template_pb2.RenderRequest(id=call.id, version=call.version, variables=variables)
        async with _hop(Hop.TEMPLATE):
            reply = await self.template.Render(request, timeout=timeout, metadata=metadata)
        return RenderedPrompt(reply.version, tuple((m.role, m.content) for m in reply.messages))

    async def list_templates(self, timeout: float, metadata=()) -> list[TemplateEntry]:
        async with _hop(Hop.TEMPLATE):
            reply = await self.template.ListTemplates(
                template_pb2.ListTemplatesRequest(), timeout=timeout, metadata=metadata
            )
        return [
            TemplateEntry(
                t.id, t.version, t.description,
                tuple((v.name, v.required, v.description) for v in t.variables), t.newest,
            )
            for t in reply.templates
        ]

    async def encode_chat(self, chat: Chat, model: str, timeout: float, metadata=()) -> list[int]:
        async with _hop(Hop.TOKENIZER):
            reply = await self.tokenizer.EncodeChat(_chat_to_pb(chat, model), timeout=timeout, metadata=metadata)
        return list(reply.token_ids)

    async def count_chat(self, chat: Chat, model: str, timeout: float, metadata=()) -> int:
        async with _hop(Hop.TOKENIZER):
            reply = await self.tokenizer.CountChat(_chat_to_pb(chat, model), timeout=timeout, metadata=metadata)
        return reply.count

    async def model_info(self, timeout: float) -> ModelInfo:
        async with _hop(Hop.INFERENCE):
            call = self.inference.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=timeout)
            reply = await call
            self._on_inference_load(InferenceLoad.from_metadata(await call.initial_metadata()))
        return ModelInfo(reply.model, reply.revision, reply.context_length, reply.default_max_new_tokens)

    async def generate(
        self, token_ids: list[int], sampling: Sampling, model: str, tenant: str, timeout: float, metadata=()
    ) -> AsyncIterator[TokenDelta | GenerationEnd]:
        request = inference_pb2.GenerateRequest(
            model=model, prompt_token_ids=token_ids, sampling=sampling.to_pb(inference_pb2.Sampling),
            tenant=tenant,
        )
        call = self.inference.Generate(request, timeout=timeout, metadata=metadata)
        end_reported = False
        try:
            async with _hop(Hop.INFERENCE):
                try:
                    self._on_inference_load(InferenceLoad.from_metadata(await call.initial_metadata()))
                    async for chunk in call:
                        if chunk.delta:
                            yield TokenDelta(chunk.delta)
                        if chunk.done:
                            yield GenerationEnd(chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens)
                    end_reported = True
                    self._on_inference_load(InferenceLoad.from_metadata(await call.trailing_metadata()))
                except grpc.aio.AioRpcError as error:  # a refusal reports the load too
                    end_reported = error.code() != grpc.StatusCode.CANCELLED
                    self._on_inference_load(InferenceLoad.from_metadata(error.trailing_metadata()))
                    raise
        finally:
            # The caller went away or failed: the engine must stop this sequence. Its end is
            # then never reported to us: the place it held is counted free at once.
            call.cancel()
            if not end_reported:
                self._on_inference_cancel()

    async def store(self, key: PromptCacheKey, answer: CachedAnswer, timeout: float, metadata=()) -> bool:
        request = cache_pb2.StoreRequest(key=key.to_pb(), answer=answer.to_pb())
        async with _hop(Hop.CACHE):
            reply = await self.cache.Store(request, timeout=timeout, metadata=metadata)
        return reply.stored


def _chat_to_pb(chat: Chat, model: str) -> tokenizer_pb2.EncodeChatRequest:
    return tokenizer_pb2.EncodeChatRequest(
        model=model, messages=[tokenizer_pb2.Message(role=r, content=c) for r, c in chat.messages]
    )
