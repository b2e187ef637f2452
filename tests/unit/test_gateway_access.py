"""GatewayAccess: the key reaches the server on every call, sync and async, unary and streaming."""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cli.connect import GatewayAccess
from meshkit.server import SERVER_OPTIONS


class RecordingHealth(health.HealthServicer):
    def __init__(self):
        super().__init__()
        self.seen: list[str | None] = []

    def Check(self, request, context):
        self.seen.append(dict(context.invocation_metadata()).get("authorization"))
        return super().Check(request, context)


def serve() -> tuple[grpc.Server, RecordingHealth, str]:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(2), options=SERVER_OPTIONS)
    servicer = RecordingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, f"127.0.0.1:{port}"


def test_a_channel_sends_the_key_on_every_call_and_none_without_one():
    server, servicer, address = serve()
    try:
        with GatewayAccess(address, api_key="k1").channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        with GatewayAccess(address).channel() as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

        async def aio_call():
            async with GatewayAccess(address, api_key="k2").aio_channel() as channel:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

        asyncio.run(aio_call())
    finally:
        server.stop(None)
    assert servicer.seen == ["Bearer k1", "Bearer k1", None, "Bearer k2"]
