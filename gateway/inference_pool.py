"""One model's inference replicas, as the gateway reaches them: channels, routing, admission and what the
model is.

Each model the gateway serves has a pool of its own (gateway/model_routes.py): a balanced channel over its
replicas, prefix-affine routing when it has several (gateway/affinity.py), a capacity gate fed by its
replicas' load reports (gateway/capacity.py), and its ModelInfo once it answered. A failure comes back as
the domain error the caller should see (meshkit.errors.from_rpc_error).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from gateway import balancing
from gateway.affinity import AffineRouter, route_key
from gateway.capacity import CapacityGate
from gateway.channels import open_channel
from gateway.hop import Hop
from gateway.inference_stream import GenerationEnd, InferenceAttempt, InferenceRetries, TokenDelta
from meshkit.errors import Unavailable, from_rpc_error
from meshkit.sampling import Sampling
from meshkit.tls import TlsConfig
from meshkit.wire import InferenceLoad

log = logging.getLogger("nlpmesh.gateway.inference")
# Under TLS every inference replica's certificate is checked against the service's name, whatever address
# reaches it (a list of endpoints, the per-model inference-<id> names of compose and Kubernetes): `nlpmesh certs
# init` issues one inference certificate for every model's replicas.
TLS_NAME = "inference"


@dataclass(frozen=True)
class ModelInfo:
    model: str  # the catalogue id the replicas serve
    revision: str
    context_length: int
    default_max_new_tokens: int
    engine: str = "builtin"


class InferencePool:
    """Channels and stubs to the inference replicas of one model at ``address`` (default: the settings'
    ``inference_addr``): host:port, a comma list of endpoints, or ``dns:///name:port``.

    ``model``: the catalogue id the replicas must serve; None = whatever they say (learnt from ModelInfo).
    ``capacity``: the admission gate of this model; its replicas' load reports feed it.
    """

    def __init__(self, settings, address: str | None = None, model: str | None = None,
                 capacity: CapacityGate | None = None):
        self._settings = settings
        self.address = address or settings.inference_addr
        self.expected_model = model
        self.capacity = capacity or CapacityGate(settings.capacity_settings())
        self.info: ModelInfo | None = None  # known once the model's replicas answered ModelInfo
        # At least one replica SERVING: true once ModelInfo answered, then kept by the gateway's health watch.
        self.serving = False
        self._channels: list[grpc.aio.Channel] = []
        self.channel: grpc.aio.Channel | None = None
        self.router: AffineRouter | None = None
        self._stubs: dict[str, inference_pb2_grpc.InferenceServiceStub] = {}
        self._resolver: asyncio.Task | None = None
        self._retiring: dict[asyncio.Task, grpc.aio.Channel] = {}  # channels of endpoints gone, closing
        self._credentials = TlsConfig.from_settings(settings).channel_credentials()

    @property
    def model(self) -> str | None:
        """The model's catalogue id: the one it was configured with, else the one it reported."""
        return self.expected_model or (self.info.model if self.info else None)

    async def open(self) -> None:
        self.channel = self._new_channel(balancing.grpc_target(self.address), TLS_NAME)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.router = self._affine_router()

    def _new_channel(self, target: str, tls_name: str | None) -> grpc.aio.Channel:
        channel = open_channel(self._settings, self._credentials, target, balancing.INFERENCE_SERVICE, tls_name)
        self._channels.append(channel)
        return channel

    def _affine_router(self) -> AffineRouter | None:
        """Prefix-affine routing (gateway/affinity.py): a channel per inference endpoint, for a list of
        endpoints, or for the addresses a ``dns:///`` name resolves to (re-resolved every
        ``affinity_resolve_s``). None (round_robin over the balanced channel) for one fixed endpoint."""
        s = self._settings
        if s.inference_routing != "prefix":
            return None
        dns = balancing.dns_name(self.address)
        router = AffineRouter({}, s.affinity_load_factor, s.admission_full_hold_s)
        if dns is not None:
            self._resolver = asyncio.get_running_loop().create_task(self._follow_dns(router, *dns))
            return router
        endpoints = balancing.endpoints(self.address)
        if len(endpoints) < 2:
            return None
        family = balancing.grpc_target(self.address).partition(":")[0]
        self._route_to(router, {e: f"{family}:{e}" for e in endpoints}, TLS_NAME)
        return router

    def _route_to(self, router: AffineRouter, targets: dict[str, str], host: str) -> None:
        """Points ``router`` at ``targets`` (endpoint: gRPC target): new endpoints get a channel (under TLS, the
        replica's certificate checked against ``host``), removed ones are closed once their calls are done."""
        current = set(router.endpoints)
        channels = {e: router.channel(e) for e in targets if e in current}
        for endpoint, target in targets.items():
            if endpoint not in current:
                channels[endpoint] = self._new_channel(target, host)
                self._stubs[endpoint] = inference_pb2_grpc.InferenceServiceStub(channels[endpoint])
        for endpoint in current - set(targets):
            channel = router.channel(endpoint)
            self._channels.remove(channel)
            del self._stubs[endpoint]
            self._retire(channel, self._settings.inference_timeout_s)
        router.update(channels)

    async def _follow_dns(self, router: AffineRouter, host: str, port: int) -> None:
        """Keeps ``router`` on the addresses ``host`` resolves to, until cancelled."""
        while True:
            try:
                endpoints = (await asyncio.wait_for(self._resolve(host, port), 5.0))[:balancing.MAX_ENDPOINTS]
                targets = {e: f"{'ipv6' if e.startswith('[') else 'ipv4'}:{e}" for e in endpoints}
                if set(targets) != set(router.endpoints):
                    log.info("inference endpoints for prefix-affine routing: %d (%s)", len(targets), host)
                    self._route_to(router, targets, TLS_NAME)
            except (TimeoutError, OSError) as error:  # the balanced channel still routes meanwhile
                log.warning("resolving %s for prefix-affine routing failed: %s", host, type(error).__name__)
            except Exception:  # a bug here must not end the routing: the endpoints stay as they were
                log.exception("following %s for prefix-affine routing failed", host)
            await asyncio.sleep(self._settings.affinity_resolve_s)

    async def _resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return sorted({balancing.endpoint_of(info[4][0], info[4][1]) for info in infos})

    def reconnect(self, credentials: grpc.ChannelCredentials | None, grace_s: float) -> None:
        """New channels with ``credentials`` (the gateway's TLS files changed) for the balanced target and every
        prefix-affine endpoint; the old ones close once their calls are done (at most ``grace_s``)."""
        old, self._channels = self._channels, []
        self._credentials = credentials
        self.channel = self._new_channel(balancing.grpc_target(self.address), TLS_NAME)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        if self.router is not None and self.router.endpoints:
            family = {e: f"{'ipv6' if e.startswith('[') else 'ipv4'}:{e}" for e in self.router.endpoints}
            channels = {e: self._new_channel(target, TLS_NAME) for e, target in family.items()}
            self._stubs.update({e: inference_pb2_grpc.InferenceServiceStub(c) for e, c in channels.items()})
            self.router.replace_channels(channels)
        for channel in old:
            self._retire(channel, grace_s)

    def _retire(self, channel: grpc.aio.Channel, grace_s: float) -> None:
        """Closes ``channel`` once its calls are done (at most ``grace_s``), off the caller's path."""
        retire = asyncio.get_running_loop().create_task(channel.close(grace=grace_s))
        self._retiring[retire] = channel
        retire.add_done_callback(lambda task: self._retiring.pop(task, None))

    async def connected(self, timeout_s: float) -> None:
        """Waits until the balanced channel is connected, so the first request pays no handshake."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout_s)
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

    async def model_info(self, timeout: float) -> ModelInfo:
        """Asks the replicas what they serve, and keeps it (``info``). A replica serving another model than
        the one this pool was configured with is a deployment fault: MisroutedModel, never routed to."""
        async with _hop():
            call = self.stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=timeout)
            reply = await call
            self.capacity.observe(InferenceLoad.from_metadata(await call.initial_metadata()))
        if self.expected_model is not None and reply.model != self.expected_model:
            raise MisroutedModel(f"the inference service at {self.address} serves model {reply.model!r}, "
                                 f"not {self.expected_model!r}")
        self.info = ModelInfo(reply.model, reply.revision, reply.context_length, reply.default_max_new_tokens,
                              reply.engine or "builtin")
        self.serving = True
        return self.info

    async def generate(
        self, token_ids: list[int], sampling: Sampling, tenant: str, timeout: float, metadata=()
    ) -> AsyncIterator[TokenDelta | GenerationEnd]:
        """The inference stream. A stream that fails UNAVAILABLE before any token reached the caller is
        retried (round_robin sends it to another replica), at most ``balancing.MAX_ATTEMPTS`` attempts
        within ``timeout``; once a token was yielded it is never retried: the stream ends UNAVAILABLE."""
        model = self.model or ""
        request = inference_pb2.GenerateRequest(
            model=model, prompt_token_ids=token_ids, sampling=sampling.to_pb(inference_pb2.Sampling),
            tenant=tenant,
        )
        retries = InferenceRetries(deadline=time.monotonic() + timeout)
        key = route_key(token_ids, self._settings.affinity_block_tokens, tenant, model) if self.router else None
        while True:
            endpoint = self._pick_endpoint(key, retries.tried)
            call = self._stub(endpoint).Generate(request, timeout=retries.time_left(), metadata=metadata)
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

    def _stub(self, endpoint: str | None) -> inference_pb2_grpc.InferenceServiceStub:
        return self._stubs[endpoint] if endpoint is not None else self.stub

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
                self.capacity.cancelled(replica)

    def _observe(self, endpoint: str | None, metadata) -> InferenceLoad | None:
        load = InferenceLoad.from_metadata(metadata)
        self.capacity.observe(load)
        if endpoint is not None:
            self.router.observe(endpoint, load)
        return load


class MisroutedModel(Unavailable):
    """The replicas at a model's address serve another model: a deployment fault. The model stays not
    ready (callers get UNAVAILABLE), and the gateway logs this while it waits."""


@asynccontextmanager
async def _hop():
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, Hop.INFERENCE) from None
