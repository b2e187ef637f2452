"""Clients for the four internal services.

Every call carries a finite deadline and the trace context; a failure comes
back as the domain error the caller should see (meshkit.errors.from_rpc_error).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2
from nlpmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from nlpmesh.template.v1 import template_pb2, template_pb2_grpc
from nlpmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from gateway import balancing
from gateway.affinity import AffineRouter, route_key
from gateway.hop import Hop
from gateway.inference_stream import GenerationEnd, InferenceAttempt, InferenceRetries, TokenDelta
from gateway.request import Chat, TemplateCall
from meshkit.errors import from_rpc_error
from meshkit.sampling import Sampling
from meshkit.server import channel_options
from meshkit.tls import TlsConfig
from meshkit.wire import InferenceLoad
from promptcache.keys import PromptCacheKey
from promptcache.redis_tier import CachedAnswer

log = logging.getLogger("nlpmesh.gateway.downstream")


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


@asynccontextmanager
async def _hop(hop: Hop):
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, hop) from None


class Downstream:
    """Channels and stubs to template, tokenizer, inference and cache.

    ``on_inference_load`` gets the load report of every inference call
    (meshkit/wire.py; None when a call carried none);
    ``on_inference_cancel`` gets the replica id of a generation this side cancelled before its end report.
    """

    def __init__(self, settings, on_inference_load: Callable[[InferenceLoad | None], None] = lambda load: None,
                 on_inference_cancel: Callable[[str], None] = lambda replica: None):
        self._settings = settings
        self._on_inference_load = on_inference_load
        self._on_inference_cancel = on_inference_cancel
        self._channels: list[grpc.aio.Channel] = []
        self._by_service: dict[str, grpc.aio.Channel] = {}
        self.router: AffineRouter | None = None
        self._inference_stubs: dict[str, inference_pb2_grpc.InferenceServiceStub] = {}
        self._resolver: asyncio.Task | None = None
        self._retiring: dict[asyncio.Task, grpc.aio.Channel] = {}  # channels of endpoints gone, closing
        # mTLS to the internal services when the mesh CA is configured.
        self._credentials = TlsConfig.from_settings(settings).channel_credentials()

    async def open(self) -> None:
        s = self._settings
        self.template = template_pb2_grpc.TemplateServiceStub(
            self._channel("template", s.template_addr, balancing.TEMPLATE_SERVICE))
        self.tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(
            self._channel("tokenizer", s.tokenizer_addr, balancing.TOKENIZER_SERVICE))
        self.inference = inference_pb2_grpc.InferenceServiceStub(
            self._channel("inference", s.inference_addr, balancing.INFERENCE_SERVICE))
        self.cache = cache_pb2_grpc.CacheServiceStub(self._channel("cache", s.cache_addr, balancing.CACHE_SERVICE))
        self.router = self._affine_router()

    def _affine_router(self) -> AffineRouter | None:
        """Prefix-affine routing (gateway/affinity.py): a channel per inference endpoint, for a list of
        endpoints, or for the addresses a ``dns:///`` name resolves to (re-resolved every
        ``affinity_resolve_s``). None (round_robin over the balanced channel) for one fixed endpoint."""
        s = self._settings
        if s.inference_routing != "prefix":
            return None
        dns = balancing.dns_name(s.inference_addr)
        router = AffineRouter({}, s.affinity_load_factor, s.admission_full_hold_s)
        if dns is not None:
            self._resolver = asyncio.get_running_loop().create_task(self._follow_dns(router, *dns))
            return router
        endpoints = balancing.endpoints(s.inference_addr)
        if len(endpoints) < 2:
            return None
        family = balancing.grpc_target(s.inference_addr).partition(":")[0]
        self._route_to(router, {e: f"{family}:{e}" for e in endpoints}, "inference")
        return router

    def _route_to(self, router: AffineRouter, targets: dict[str, str], host: str) -> None:
        """Points ``router`` at ``targets`` (endpoint: gRPC target): new endpoints get a channel (under TLS, the
        replica's certificate checked against ``host``), removed ones are closed once their calls are done."""
        current = set(router.endpoints)
        channels = {e: router.channel(e) for e in targets if e in current}
        for endpoint, target in targets.items():
            if endpoint not in current:
                channels[endpoint] = self._new_channel(target, balancing.INFERENCE_SERVICE, host)
                self._inference_stubs[endpoint] = inference_pb2_grpc.InferenceServiceStub(channels[endpoint])
        for endpoint in current - set(targets):
            channel = router.channel(endpoint)
            self._channels.remove(channel)
            del self._inference_stubs[endpoint]
            retire = asyncio.get_running_loop().create_task(channel.close(grace=self._settings.inference_timeout_s))
            self._retiring[retire] = channel
            retire.add_done_callback(lambda task: self._retiring.pop(task, None))
        router.update(channels)

    async def _follow_dns(self, router: AffineRouter, host: str, port: int) -> None:
        """Keeps ``router`` on the addresses ``host`` resolves to, until cancelled."""
        while True:
            try:
                endpoints = (await asyncio.wait_for(self._resolve(host, port), 5.0))[:balancing.MAX_ENDPOINTS]
                targets = {e: f"{'ipv6' if e.startswith('[') else 'ipv4'}:{e}" for e in endpoints}
                if set(targets) != set(router.endpoints):
                    log.info("inference endpoints for prefix-affine routing: %d (%s)", len(targets), host)
                    self._route_to(router, targets, host)
            except (TimeoutError, OSError) as error:  # the balanced channel still routes meanwhile
                log.warning("resolving %s for prefix-affine routing failed: %s", host, type(error).__name__)
            except Exception:  # a bug here must not end the routing: the endpoints stay as they were
                log.exception("following %s for prefix-affine routing failed", host)
            await asyncio.sleep(self._settings.affinity_resolve_s)

    async def _resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return sorted({balancing.endpoint_of(info[4][0], info[4][1]) for info in infos})

    def _channel(self, name: str, address: str, service: str) -> grpc.aio.Channel:
        """One channel over every replica at ``address``, balanced and retried by its service config
        (gateway/balancing.py)."""
        # Under TLS a list of endpoints has no one host name to check: each replica's certificate is checked
        # against the service's name (``nlpmesh certs init`` issues it with that name).
        listed = len(balancing.endpoints(address)) > 1
        channel = self._new_channel(balancing.grpc_target(address), service, name if listed else None)
        self._by_service[name] = channel
        return channel

    def _new_channel(self, target: str, service: str, tls_name: str | None = None) -> grpc.aio.Channel:
        # A restarted service is reached again within seconds: gRPC's own reconnect backoff grows to 120 s.
        options = [*channel_options(self._settings.max_message_bytes),
                   ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000),
                   ("grpc.service_config", balancing.service_config(service)),
                   # Ours, not one from DNS TXT records.
                   ("grpc.service_config_disable_resolution", 1),
                   ("grpc.enable_retries", 1)]
        if tls_name is not None and self._credentials is not None:
            options.append(("grpc.ssl_target_name_override", tls_name))
        channel = (grpc.aio.secure_channel(target, self._credentials, options=options) if self._credentials
                   else grpc.aio.insecure_channel(target, options=options))
        self._channels.append(channel)
        return channel

    def required_channels(self) -> dict[str, grpc.aio.Channel]:
        """The channels a generation needs, by service name.

        Not the cache service: without it answers are not stored, but the mesh still answers.
        """
        return {name: self._by_service[name] for name in ("template", "tokenizer", "inference")}

    async def connected(self, timeout_s: float) -> None:
        """Waits until the channels a request needs are connected, so the first one pays no handshake."""
        self._by_service["cache"].get_state(try_to_connect=True)
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self.required_channels().values())),
                               timeout_s)
        if self.router is not None and self.router.endpoints:
            # The endpoints of prefix-affine routing too (briefly: a replica that is down may stay down; until an
            # endpoint is ready, its generations go round_robin).
            waits = [asyncio.ensure_future(self.router.channel(e).channel_ready()) for e in self.router.endpoints]
            _, pending = await asyncio.wait(waits, timeout=min(timeout_s, 5.0))
            for wait in pending:
                wait.cancel()

    async def close(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resolver
        for task, channel in list(self._retiring.items()):  # no more grace: shutting down
            task.cancel()
            await channel.close()
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
        """The inference stream. A stream that fails UNAVAILABLE before any token reached the caller is
        retried (round_robin sends it to another replica), at most ``balancing.MAX_ATTEMPTS`` attempts
        within ``timeout``; once a token was yielded it is never retried: the stream ends UNAVAILABLE."""
        request = inference_pb2.GenerateRequest(
            model=model, prompt_token_ids=token_ids, sampling=sampling.to_pb(inference_pb2.Sampling),
            tenant=tenant,
        )
        retries = InferenceRetries(deadline=time.monotonic() + timeout)
        key = route_key(token_ids, self._settings.affinity_block_tokens, tenant) if self.router else None
        while True:
            endpoint = self._pick_endpoint(key, retries.tried)
            call = self._inference_stub(endpoint).Generate(request, timeout=retries.time_left(), metadata=metadata)
            attempt = InferenceAttempt(call, functools.partial(self._observe, endpoint))
            try:
                async with self._running(attempt, endpoint) as events:
                    async for event in events:
                        yield event
                return
            except grpc.aio.AioRpcError as error:
                if not retries.retry(error, attempt, endpoint):
                    raise from_rpc_error(error, Hop.INFERENCE) from None
                log.warning("inference stream UNAVAILABLE before its first token (attempt %d of %d): "
                            "retrying on another replica", retries.attempts, balancing.MAX_ATTEMPTS)

    def _pick_endpoint(self, key: bytes | None, tried: set[str]) -> str | None:
        """The endpoint prefix-affine routing picks for ``key``, passing over those tried; None: the balanced
        channel (round_robin), as without a router, a key, or a ready endpoint."""
        return self.router.pick(key, frozenset(tried)) if key is not None else None

    def _inference_stub(self, endpoint: str | None) -> inference_pb2_grpc.InferenceServiceStub:
        return self._inference_stubs[endpoint] if endpoint is not None else self.inference

    @asynccontextmanager
    async def _running(self, attempt: InferenceAttempt, endpoint: str | None):
        """The attempt's events, counted in flight to ``endpoint`` (prefix-affine routing's load bound).

        However the attempt ends (its caller went away or failed, or the stream is over), its call is
        cancelled, so the engine stops the sequence; a place its replica will never report free (no end
        report came) is counted free at once.
        """
        try:
            with self.router.call(endpoint) if endpoint is not None else contextlib.nullcontext():
                async with contextlib.aclosing(attempt.events()) as events:
                    yield events
        finally:
            replica = attempt.end()
            if replica is not None:
                self._on_inference_cancel(replica)

    def _observe(self, endpoint: str | None, metadata) -> InferenceLoad | None:
        load = InferenceLoad.from_metadata(metadata)
        self._on_inference_load(load)
        if endpoint is not None:
            self.router.observe(endpoint, load)
        return load

    async def store(self, key: PromptCacheKey, answer: CachedAnswer, timeout: float, metadata=()) -> bool:
        request = cache_pb2.StoreRequest(key=key.to_pb(), answer=answer.to_pb())
        async with _hop(Hop.CACHE):
            reply = await self.cache.Store(request, timeout=timeout, metadata=metadata)
        return reply.stored


def _chat_to_pb(chat: Chat, model: str) -> tokenizer_pb2.EncodeChatRequest:
    return tokenizer_pb2.EncodeChatRequest(
        model=model, messages=[tokenizer_pb2.Message(role=r, content=c) for r, c in chat.messages]
    )
