"""The gateway's health follows the services a generation needs.

The generation path ("" and the Gateway service name) is SERVING only while
template, tokenizer and the default model's inference each answer their own
grpc.health.v1 Check as SERVING, so a load balancer stops sending generations to a
gateway that cannot make them. Each model has a health name of its own,
``model_health_name(id)`` (``nlpmesh.gateway.v1.Gateway/models/<id>``): SERVING
while the gateway knows the model (its ModelInfo answered) and its inference
replicas answer SERVING; one model down leaves the others (and, unless it is the
default, the generation path) SERVING. Cache hits need none of them (the gateway
reads the prompt cache from Redis itself), so ``CACHE_PATH`` stays SERVING once the
gateway is ready. The names are in gateway/health_names.py.

The checks go over the gateway's own channels to those services (gateway/
downstream.py), so they present its client certificate when the mesh runs mTLS.
Periodic Checks with a short deadline rather than Watch streams: a stopped
process (SIGSTOP, a hung host) keeps a Watch stream open and silent.

With replicas, a service's channel balances round_robin over the replicas its
client-side health checks call SERVING (gateway/balancing.py), so each
Check goes to a replica in rotation: a service counts as down only when no
replica is ready (the Check fails UNAVAILABLE), or when ``failures`` checks in a
row fail. One replica down or draining leaves the generation path SERVING.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.health_names import CACHE_PATH, GENERATION_PATH, model_health_name
from gateway.model_routes import ModelRoutes
from meshkit.server import NOT_SERVING, SERVING

log = logging.getLogger("nlpmesh.gateway.health")


@dataclass(frozen=True)
class HealthChecks:
    interval_s: float = 1.0
    timeout_s: float = 1.0
    # Consecutive failed checks before a service counts as down: one slow answer on a busy host is not an outage.
    failures: int = 2


class DownstreamHealth:
    """``channels``: the services the generation path needs, by name; ``models``: each model's pool, whose
    health name follows its own inference replicas."""

    def __init__(self, channels: Callable[[], dict[str, grpc.aio.Channel]], checks: HealthChecks,
                 models: ModelRoutes | None = None):
        self._channels = channels  # read at each check: the gateway opens new channels when its TLS files change
        self._checks = checks
        self._failed = dict.fromkeys(channels(), 0)
        self._models = models
        self._model_failed: dict[str, int] = {}
        self._model_serving: dict[str, bool] = {}

    async def check(self, name: str) -> str | None:
        """None when ``name`` is SERVING, else why not (its status, or the call's error code)."""
        return await self._check(health_pb2_grpc.HealthStub(self._channels()[name]))

    async def _check(self, stub: health_pb2_grpc.HealthStub) -> str | None:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self._checks.timeout_s)
        except grpc.aio.AioRpcError as error:
            return error.code().name
        if reply.status != SERVING:
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return None

    async def watch_models(self, health) -> None:
        """Sets each model's health name on ``health``: SERVING once the model is known and while its replicas
        answer, NOT_SERVING after ``failures`` failed checks in a row."""
        pools = [pool for pool in self._models.pools if pool.model is not None] if self._models else []
        reasons = await asyncio.gather(*(self._check(health_pb2_grpc.HealthStub(pool.channel)) for pool in pools))
        for pool, reason in zip(pools, reasons):
            model = pool.model
            self._model_failed[model] = 0 if reason is None else self._model_failed.get(model, 0) + 1
            serving = pool.info is not None and self._model_failed[model] < self._checks.failures
            if self._model_serving.get(model) == serving:
                continue
            self._model_serving[model] = pool.serving = serving
            await health.set(model_health_name(model), SERVING if serving else NOT_SERVING)
            if serving:
                log.info("model %s SERVING", model)
            elif pool.info is not None:
                log.warning("model %s NOT_SERVING: its inference replicas do not answer (%s)", model, reason)

    async def down(self) -> list[str]:
        """The services down now ("tokenizer (DEADLINE_EXCEEDED)"), each after ``failures`` failed checks in a row."""
        names = list(self._failed)
        reasons = await asyncio.gather(*(self.check(name) for name in names))
        down = []
        for name, reason in zip(names, reasons):
            self._failed[name] = 0 if reason is None else self._failed[name] + 1
            if self._failed[name] >= self._checks.failures:
                down.append(f"{name} ({reason})")
        return down

    async def watch(self, health) -> None:
        """Sets the generation path's status on ``health`` (a grpc_health HealthServicer) until cancelled."""
        serving = True  # the server just turned SERVING
        while True:
            try:
                await self.watch_models(health)
                down = await self.down()
            except Exception:  # a bug here must not end the watch: the status stays as it was
                log.exception("checking the internal services' health failed")
                down = ["unknown"] if not serving else []
            if bool(down) == serving:
                serving = not down
                for name in GENERATION_PATH:
                    await health.set(name, SERVING if serving else NOT_SERVING)
                if serving:
                    log.info("generation path SERVING again: template, tokenizer and the default model's "
                             "inference answer")
                else:
                    log.warning("generation path NOT_SERVING: %s down; cache hits are still served (%s)",
                                ", ".join(down), CACHE_PATH)
            await asyncio.sleep(self._checks.interval_s)
