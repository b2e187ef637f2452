"""gRPC edge of the tokenizer service: protobuf in, domain calls, protobuf out.

It serves every model of NLPMESH_TOKENIZER_MODELS (empty: every converted catalogue model), each with its
own tokenizer and chat template, by catalogue id; a request without a model gets the first.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import grpc
from nlpmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from meshkit import span_names
from meshkit.errors import NotFound, ResourceExhausted, Unavailable
from meshkit.server import ServiceSpec, rpc_method
from meshkit.tracing.stand_in import span_later, tracer_now
from modelfiles.catalogue import load_catalogue
from modelfiles.convert import converted_revision, load_model_files
from services.tokenizer.chat_tokenizer import ChatMessage, ChatTokenizer
from services.tokenizer.settings import TokenizerSettings

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """``load`` gives the tokenizers served, the default (for a request without a model) first."""

    def __init__(self, load: Callable[[], Sequence[ChatTokenizer]]):
        self._load = load
        self._tokenizers: dict[str, ChatTokenizer] = {}

    async def warm_up(self) -> None:
        # Loading reads files and builds the Rust tokenizers: keep it off the event loop.
        tokenizers = await asyncio.to_thread(self._load)
        for tokenizer in tokenizers:
            # One encode compiles the chat template and starts the worker thread,
            # so the first caller does not pay for either.
            await asyncio.to_thread(tokenizer.encode_chat, [ChatMessage("user", "warm-up")])
        self._tokenizers = {tokenizer.name: tokenizer for tokenizer in tokenizers}

    @rpc_method
    async def EncodeChat(self, request, context) -> tokenizer_pb2.EncodeResponse:
        tokenizer = self._serving(request.model)
        with span_later(tracer_now("tokenizer"), span_names.TOKENIZER_ENCODE) as span:
            ids = await _within_limit(tokenizer, tokenizer.encode_chat, _messages_from_pb(request))
            span.set_attribute(span_names.TOKEN_COUNT, len(ids))
        return tokenizer_pb2.EncodeResponse(token_ids=ids, model=tokenizer.name)

    @rpc_method
    async def CountChat(self, request, context) -> tokenizer_pb2.CountResponse:
        tokenizer = self._serving(request.model)
        with span_later(tracer_now("tokenizer"), span_names.TOKENIZER_COUNT) as span:
            count = await _within_limit(tokenizer, tokenizer.count_chat, _messages_from_pb(request))
            span.set_attribute(span_names.TOKEN_COUNT, count)
        return tokenizer_pb2.CountResponse(count=count, model=tokenizer.name)

    @rpc_method
    async def Decode(self, request, context) -> tokenizer_pb2.DecodeResponse:
        tokenizer = self._serving(request.model)
        text = await asyncio.to_thread(tokenizer.decode, list(request.token_ids), request.skip_special_tokens)
        return tokenizer_pb2.DecodeResponse(text=text)

    def _serving(self, model: str) -> ChatTokenizer:
        """The tokenizer of ``model`` (empty: the default); NotFound naming the models served."""
        if not self._tokenizers:
            raise Unavailable("the tokenizer is still loading")
        if not model:
            return next(iter(self._tokenizers.values()))
        tokenizer = self._tokenizers.get(model)
        if tokenizer is None:
            raise NotFound(f"no model {model!r}; this tokenizer serves {', '.join(self._tokenizers)}")
        return tokenizer


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


def served_models(settings: TokenizerSettings) -> list[str]:
    """The catalogue ids to serve: NLPMESH_TOKENIZER_MODELS, else every converted generative catalogue model (a model
    named there that is not converted stops the start, naming how to convert it)."""
    if settings.models.strip():
        return [model.strip() for model in settings.models.split(",") if model.strip()]
    catalogue = load_catalogue()
    converted = [model.id for model in catalogue.models if model.task == "generation"
                 and converted_revision(settings.home, model.files_id) is not None]
    return converted or [catalogue.ids[0]]  # none converted: the default's load says how to convert it


def build_spec(settings: TokenizerSettings) -> ServiceSpec:
    def load() -> list[ChatTokenizer]:
        tokenizers, catalogue = [], load_catalogue()
        for model in served_models(settings):
            # An external engine's entry shares a built-in entry's files (its files_id).
            files = load_model_files(settings.home, catalogue.get(model).files_id if model in catalogue.ids else model)
            tokenizers.append(ChatTokenizer.from_folder(files.path, model, settings.limits))
        return tokenizers

    servicer = TokenizerServicer(load)

    def register(server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(servicer, server)

    return ServiceSpec(
        name="tokenizer", service_names=(SERVICE_NAME,), register=register, warm_up=servicer.warm_up
    )
