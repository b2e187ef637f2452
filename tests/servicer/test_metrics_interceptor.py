"""The RPC metrics interceptor on a real in-process grpc.aio server (create_server installs it)."""
import asyncio
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from meshkit.errors import NotFound
from meshkit.server import ServiceSpec, rpc_method
from meshkit.settings import ServiceSettings
from tests.polling import until

PROBE = "nlpmesh.test.v1.Probe"


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Probe:
    """A servicer of raw bytes: each method is one way for a call to end."""

    @rpc_method
    async def Echo(self, request, context):
        return request

    @rpc_method
    async def Missing(self, request, context):
        raise NotFound("no such thing")

    @rpc_method
    async def Buggy(self, request, context):
        raise RuntimeError("a bug")

    @rpc_method
    async def Slow(self, request, context):
        await asyncio.sleep(5)  # longer than any caller's deadline
        return request

    @rpc_method
    async def Count(self, request, context):
        for i in range(3):
            await asyncio.sleep(0.05)  # the time the call takes: its timed duration is the behaviour
            yield bytes([i])

    @rpc_method
    async def Forever(self, request, context):
        while True:
            yield b"."
            await asyncio.sleep(0.01)  # an endless stream's pace, until the caller cancels it


def probe_spec(service: str) -> ServiceSpec:
    probe = Probe()
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(probe, name))
                for name in ("Echo", "Missing", "Buggy", "Slow")}
    handlers |= {name: grpc.unary_stream_rpc_method_handler(getattr(probe, name)) for name in ("Count", "Forever")}
    return ServiceSpec(name=service, service_names=(PROBE,),
                       register=lambda server: server.add_generic_rpc_handlers(
                           [grpc.method_handlers_generic_handler(PROBE, handlers)]))


def with_probe(inprocess_server, scenario):
    """Runs ``scenario(channel, service)`` against a probe server named uniquely (fresh label values)."""
    service = f"probe_{uuid.uuid4().hex[:8]}"

    async def main():
        async with inprocess_server(probe_spec(service), ServiceSettings()) as running:
            await scenario(running.channel, service)

    asyncio.run(main())
    return service


def handled(service: str, method: str, code: str) -> float:
    return sample("nlpmesh_rpc_handled_total", service=service, method=method, code=code)


def calls(service: str, method: str) -> float:
    return sample("nlpmesh_rpc_duration_seconds_count", service=service, method=method)


def test_unary_calls_are_timed_and_counted_by_status_code(inprocess_server):
    async def scenario(channel, service):
        await channel.unary_unary(f"/{PROBE}/Echo")(b"hi")
        await channel.unary_unary(f"/{PROBE}/Echo")(b"hi")
        for method in ("Missing", "Buggy"):
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary(f"/{PROBE}/{method}")(b"hi")

    service = with_probe(inprocess_server, scenario)
    assert handled(service, "Echo", "OK") == 2
    assert calls(service, "Echo") == 2
    assert handled(service, "Missing", "NOT_FOUND") == 1
    assert handled(service, "Buggy", "INTERNAL") == 1
    assert handled(service, "Echo", "INTERNAL") == 0


def test_a_server_stream_is_timed_until_it_ends(inprocess_server):
    async def scenario(channel, service):
        chunks = [chunk async for chunk in channel.unary_stream(f"/{PROBE}/Count")(b"")]
        assert len(chunks) == 3

    service = with_probe(inprocess_server, scenario)
    assert handled(service, "Count", "OK") == 1
    assert sample("nlpmesh_rpc_duration_seconds_sum", service=service, method="Count") >= 0.15  # three sleeps
    assert sample("nlpmesh_rpc_duration_seconds_bucket", service=service, method="Count", le="0.1") == 0


def test_a_cancelled_stream_and_a_missed_deadline_are_told_apart(inprocess_server):
    async def scenario(channel, service):
        call = channel.unary_stream(f"/{PROBE}/Forever")(b"")
        await call.read()
        call.cancel()
        # Server-side recording ends after the client has its answer: wait for it.
        await until(lambda: handled(service, "Forever", "CANCELLED") == 1, what="the cancelled call's count")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await channel.unary_unary(f"/{PROBE}/Slow")(b"", timeout=0.1)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: handled(service, "Slow", "DEADLINE_EXCEEDED") == 1, what="the missed deadline's count")

    service = with_probe(inprocess_server, scenario)
    assert calls(service, "Forever") == 1 and calls(service, "Slow") == 1


def test_health_checks_and_unknown_methods_are_not_recorded(inprocess_server):
    async def scenario(channel, service):
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await channel.unary_unary(f"/{PROBE}/NoSuchMethod")(b"")
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED

    service = with_probe(inprocess_server, scenario)
    recorded = [s for metric in REGISTRY.collect() if metric.name.startswith("nlpmesh_rpc_")
                for s in metric.samples if s.labels.get("service") == service]
    assert recorded == []


def test_two_servers_of_one_service_in_one_process_share_the_metrics(inprocess_server):
    service = f"probe_{uuid.uuid4().hex[:8]}"

    async def main():
        async with (inprocess_server(probe_spec(service), ServiceSettings()) as first,
                    inprocess_server(probe_spec(service), ServiceSettings()) as second):
            await first.channel.unary_unary(f"/{PROBE}/Echo")(b"")
            await second.channel.unary_unary(f"/{PROBE}/Echo")(b"")

    asyncio.run(main())
    assert handled(service, "Echo", "OK") == 2
