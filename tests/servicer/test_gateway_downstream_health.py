"""The gateway's generation path follows its downstream services' health, over real in-process channels."""
import asyncio
from contextlib import asynccontextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.downstream_health import CACHE_PATH, GENERATION_PATH, DownstreamHealth, HealthChecks
from meshkit.server import NOT_SERVING, SERVER_OPTIONS, SERVING
from tests.polling import until

NAMES = ("template", "tokenizer", "inference")
FAST = HealthChecks(interval_s=0.05, timeout_s=0.5, failures=2)


@asynccontextmanager
async def downstream():
    """Three health servers standing in for the internal services, and the gateway's channels to them."""
    servers, servicers, channels = {}, {}, {}
    for name in NAMES:
        servers[name] = grpc.aio.server(options=SERVER_OPTIONS)
        servicers[name] = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicers[name], servers[name])
        port = servers[name].add_insecure_port("127.0.0.1:0")
        await servers[name].start()
        await servicers[name].set("", SERVING)
        channels[name] = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicers, channels, servers
    finally:
        for name in NAMES:
            await channels[name].close()
            await servers[name].stop(None)


async def _is(servicer, name: str, status: int) -> bool:
    reply = await servicer.Check(health_pb2.HealthCheckRequest(service=name), None)
    return reply.status == status


def test_the_generation_path_is_not_serving_while_a_required_service_is_not_and_the_cache_path_stays_serving():
    async def scenario():
        async with downstream() as (servicers, channels, _):
            gateway = health.aio.HealthServicer()
            for name in (*GENERATION_PATH, CACHE_PATH):
                await gateway.set(name, SERVING)
            watch = asyncio.create_task(DownstreamHealth(lambda: channels, FAST).watch(gateway))
            try:
                await servicers["tokenizer"].set("", NOT_SERVING)
                for name in GENERATION_PATH:
                    await until(lambda name=name: _is(gateway, name, NOT_SERVING), what=f"{name!r} NOT_SERVING")
                assert await _is(gateway, CACHE_PATH, SERVING)
                await servicers["tokenizer"].set("", SERVING)
                for name in GENERATION_PATH:
                    await until(lambda name=name: _is(gateway, name, SERVING), what=f"{name!r} SERVING again")
            finally:
                watch.cancel()

    asyncio.run(scenario())


def test_an_unreachable_service_counts_as_down_only_after_consecutive_failures():
    async def scenario():
        async with downstream() as (_, channels, servers):
            checks = DownstreamHealth(lambda: channels, FAST)
            assert await checks.down() == []
            await servers["inference"].stop(None)
            assert await checks.down() == []  # one failure: not yet
            down = await checks.down()
            assert len(down) == 1 and down[0].startswith("inference (")

    asyncio.run(scenario())
