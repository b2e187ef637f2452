"""gRPC edge of the tokenizer service: protobuf in, domain calls, protobuf out."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from nlpmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from meshkit import span_names
from meshkit.errors import ResourceExhausted, Unavailable
from meshkit.server import ServiceSpec, rpc_method
from meshkit.tracing.provider import tracer
from modelfiles.convert import load_model_files
from services.tokenizer.chat_tokenizer import ChatMessage, ChatTokenizer
from services.tokenizer.settings import TokenizerSettings

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name

_tracer = tracer("tokenizer")


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, load: Callable[[], ChatTokenizer]):
        self._load = load
        self._tokenizer: ChatTokenizer | None = None

    async def warm_up(self) -> None:
        # Loading reads files and builds the Rust tokenizer: keep it off the event loop.
        tokenizer = await asyncio.to_thread(self._load)
        # One encode compiles the chat template and starts the worker thread,
        # so the first caller does not pay for either.
        await asyncio.to_thread(tokenizer.encode_chat, [ChatMessage("user", "warm-up")])
        self._tokenizer = tokenizer

    @rpc_method
    async def EncodeChat(self, request, context) -> tokenizer_pb2.EncodeResponse:
        tokenizer = self._serving(request.model)
        with _tracer.start_as_current_span(span_names.TOKENIZER_ENCODE) as span:
            ids = await _within_limit(tokenizer, tokenizer.encode_chat, _messages_from_pb(request))
            span.set_attribute(span_names.TOKEN_COUNT, len(ids))
        return tokenizer_pb2.EncodeResponse(token_ids=ids, model=tokenizer.name)

    @rpc_method
    async def CountChat(self, request, context) -> tokenizer_pb2.CountResponse:
        tokenizer = self._serving(request.model)
        with _tracer.start_as_current_span(span_names.TOKENIZER_COUNT) as span:
            count = await _within_limit(tokenizer, tokenizer.count_chat, _messages_from_pb(request))
            span.set_attribute(span_names.TOKEN_COUNT, count)
        return tokenizer_pb2.CountResponse(count=count, model=tokenizer.name)

    @rpc_method
    async def Decode(self, request, context) -> tokenizer_pb2.DecodeResponse:
        tokenizer = self._serving(request.model)
        text = await asyncio.to_thread(tokenizer.decode, list(request.token_ids), request.skip_special_tokens)
        return tokenizer_pb2.DecodeResponse(text=text)

    def _serving(self, model: str) -> ChatTokenizer:
        if self._tokenizer is None:
            raise Unavailable("the tokenizer is still loading")
        self._tokenizer.check_model(model)
        return self._tokenizer


async def _within_limit(tokenizer: ChatTokenizer, work, messages: list[ChatMessage]):
    """``work(messages)`` on a worker thread, answered RESOURCE_EXHAUSTED once past the render limit.

    A deadline rather than checks between chunks (as the template service does):
    transformers renders the chat template with ``Template.render()`` inside
    ``apply_chat_template``, where it also marks control tokens for encoding as
    text, and splitting that up would mean reaching into its internals. The
    template is the model's, vetted with it, and its input is bounded
    (ChatLimits); the deadline bounds what a caller waits. A thread cannot be
    stopped, so a runaway render still finishes in the background.
    """
    limit_ms = tokenizer.limits.render_timeout_ms
    try:
        return await asyncio.wait_for(asyncio.to_thread(work, messages), limit_ms / 1000)
    except TimeoutError:
        raise ResourceExhausted(f"the chat template took longer than its {limit_ms:.0f} ms limit") from None


def _messages_from_pb(request: tokenizer_pb2.EncodeChatRequest) -> list[ChatMessage]:
    return [ChatMessage(role=m.role, content=m.content) for m in request.messages]


def build_spec(settings: TokenizerSettings) -> ServiceSpec:
    def load() -> ChatTokenizer:
        files = load_model_files(settings.home)
        return ChatTokenizer.from_folder(files.path, files.name, settings.limits)

    servicer = TokenizerServicer(load)

    def register(server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(servicer, server)

    return ServiceSpec(
        name="tokenizer", service_names=(SERVICE_NAME,), register=register, warm_up=servicer.warm_up
    )
