"""The gateway's health follows the services a generation needs.

The generation path ("" and the Gateway service name) is SERVING only while
template, tokenizer and inference each answer their own grpc.health.v1 Check as
SERVING, so a load balancer stops sending generations to a gateway that cannot
make them. Cache hits need none of them (the gateway reads the prompt cache from
Redis itself), so ``CACHE_PATH`` stays SERVING once the gateway is ready.

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
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nlpmesh.gateway.v1 import gateway_pb2

from meshkit.server import NOT_SERVING, SERVING

log = logging.getLogger("nlpmesh.gateway.health")

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
GENERATION_PATH = ("", GATEWAY_SERVICE)
CACHE_PATH = f"{GATEWAY_SERVICE}/cache"


@dataclass(frozen=True)
class HealthChecks:
    interval_s: float = 1.0
    timeout_s: float = 1.0
    # Consecutive failed checks before a service counts as down: one slow answer on a busy host is not an outage.
    failures: int = 2


class DownstreamHealth:
    def __init__(self, channels: dict[str, grpc.aio.Channel], checks: HealthChecks):
        self._stubs = {name: health_pb2_grpc.HealthStub(channel) for name, channel in channels.items()}
        self._checks = checks
        self._failed = dict.fromkeys(channels, 0)

    async def check(self, name: str) -> str | None:
        """None when ``name`` is SERVING, else why not (its status, or the call's error code)."""
        try:
            reply = await self._stubs[name].Check(health_pb2.HealthCheckRequest(), timeout=self._checks.timeout_s)
        except grpc.aio.AioRpcError as error:
            return error.code().name
        if reply.status != SERVING:
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return None

    async def down(self) -> list[str]:
        """The services down now ("tokenizer (DEADLINE_EXCEEDED)"), each after ``failures`` failed checks in a row."""
        names = list(self._stubs)
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
                down = await self.down()
            except Exception:  # a bug here must not end the watch: the status stays as it was
                log.exception("checking the internal services' health failed")
                down = ["unknown"] if not serving else []
            if bool(down) == serving:
                serving = not down
                for name in GENERATION_PATH:
                    await health.set(name, SERVING if serving else NOT_SERVING)
                if serving:
                    log.info("generation path SERVING again: template, tokenizer and inference answer")
                else:
                    log.warning("generation path NOT_SERVING: %s down; cache hits are still served (%s)",
                                ", ".join(down), CACHE_PATH)
            await asyncio.sleep(self._checks.interval_s)
