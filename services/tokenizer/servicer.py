"""gRPC edge of the tokenizer service: protobuf in, domain calls, protobuf out.

It serves every model of NLPMESH_TOKENIZER_MODELS (empty: every converted catalogue model), each with its
own tokenizer and chat template, by catalogue id; a request without a model gets the first.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
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

log = logging.getLogger("nlpmesh.tokenizer")

# A chat of at most this many characters (all messages' content) is encoded in the event loop, where its
# model's template passed the warm-up's probe (``_renders_quickly``): a short chat's encode is short, and
# the hand-off to a worker thread and back would be a good part of it; a longer one would hold up the loop.
INLINE_CHAT_CHARS = 2048
INLINE_PROBE_TURNS = 15
# The probe's encode may take at most this share of the render limit.
INLINE_PROBE_SHARE = 0.05

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """``load`` gives the tokenizers served, the default (for a request without a model) first."""

    def __init__(self, load: Callable[[], Sequence[ChatTokenizer]]):
        self._load = load
        self._tokenizers: dict[str, ChatTokenizer] = {}
        # The models whose short chats are encoded in the event loop (``_chat_ids``).
        self._inline: set[str] = set()

    async def warm_up(self) -> None:
        # Loading reads files and builds the Rust tokenizers: keep it off the event loop.
        tokenizers = await asyncio.to_thread(self._load)
        for tokenizer in tokenizers:
            # The probe compiles the chat template and starts the worker thread, so the first caller
            # does not pay for either, and says whether the template is quick enough for the event loop.
            if await _renders_quickly(tokenizer):
                self._inline.add(tokenizer.name)
        self._tokenizers = {tokenizer.name: tokenizer for tokenizer in tokenizers}

    @rpc_method
    async def EncodeChat(self, request, context) -> tokenizer_pb2.EncodeResponse:
        tokenizer = self._serving(request.model)
        with span_later(tracer_now("tokenizer"), span_names.TOKENIZER_ENCODE) as span:
            ids = await self._chat_ids(tokenizer, _messages_from_pb(request))
            span.set_attribute(span_names.TOKEN_COUNT, len(ids))
        return tokenizer_pb2.EncodeResponse(token_ids=ids, model=tokenizer.name)

    @rpc_method
    async def CountChat(self, request, context) -> tokenizer_pb2.CountResponse:
        tokenizer = self._serving(request.model)
        with span_later(tracer_now("tokenizer"), span_names.TOKENIZER_COUNT) as span:
            count = len(await self._chat_ids(tokenizer, _messages_from_pb(request)))
            span.set_attribute(span_names.TOKEN_COUNT, count)
        return tokenizer_pb2.CountResponse(count=count, model=tokenizer.name)

    @rpc_method
    async def Decode(self, request, context) -> tokenizer_pb2.DecodeResponse:
        tokenizer = self._serving(request.model)
        text = await asyncio.to_thread(tokenizer.decode, list(request.token_ids), request.skip_special_tokens)
        return tokenizer_pb2.DecodeResponse(text=text)

    async def _chat_ids(self, tokenizer: ChatTokenizer, messages: list[ChatMessage]) -> list[int]:
        """The chat's ids: in the event loop for a chat of at most INLINE_CHAT_CHARS characters, where the
        model's template passed its probe and no other call is encoding; else on a worker thread, under the
        render limit."""
        if tokenizer.name in self._inline and sum(len(m.content) for m in messages) <= INLINE_CHAT_CHARS:
            ids = tokenizer.encode_chat_if_idle(messages)
            if ids is not None:
                return ids
        return await _within_limit(tokenizer, tokenizer.encode_chat, messages)

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


async def _renders_quickly(tokenizer: ChatTokenizer) -> bool:
    """Whether a chat of INLINE_CHAT_CHARS characters (alternating user and assistant turns, within the chat
    limits) encodes within INLINE_PROBE_SHARE of the render limit, the second time (the first compiles the
    template and starts the worker thread). A template that does not, or fails on it, is logged, and its
    chats all go to a worker thread under the limit. The model's template is read once, at load, so one
    probe holds for the process's life."""
    limits = tokenizer.limits  # the probe keeps within them, as a caller's chat must
    turns = min(INLINE_PROBE_TURNS, limits.max_messages)
    turns -= 1 - turns % 2  # odd: the chat ends on the user's turn
    each = min(min(INLINE_CHAT_CHARS, limits.max_chat_chars) // turns, limits.max_message_chars)
    chat = [ChatMessage("user" if turn % 2 == 0 else "assistant", ("probe " * each)[:each]) for turn in range(turns)]
    most_ms = limits.render_timeout_ms * INLINE_PROBE_SHARE
    took_ms = math.inf
    try:
        for _ in range(2):
            started = time.perf_counter()
            await _within_limit(tokenizer, tokenizer.encode_chat, chat)
            took_ms = (time.perf_counter() - started) * 1000
    except ResourceExhausted:
        pass  # past the render limit
    except Exception as error:  # the template's own refusal included; its text is the model's, not a caller's
        log.warning("%s: the chat template failed its probe (%s); every chat is encoded on a worker thread",
                    tokenizer.name, type(error).__name__)
        return False
    if took_ms > most_ms:
        log.warning("%s: the chat template took more than %.0f ms for a chat of %d characters; every chat is "
                    "encoded on a worker thread", tokenizer.name, most_ms, each * turns)
        return False
    return True


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
