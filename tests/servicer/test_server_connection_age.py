"""A server closes a connection at its maximum age, so clients reconnect (and re-resolve dns:/// names)."""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.template.servicer import build_spec as template_spec
from services.template.settings import TemplateSettings


async def _states_after_a_call(channel: grpc.aio.Channel, watch_s: float) -> list[grpc.ChannelConnectivity]:
    stub = health_pb2_grpc.HealthStub(channel)
    await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    states = [channel.get_state()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + watch_s
    while states[-1] == grpc.ChannelConnectivity.READY and loop.time() < deadline:
        try:
            await asyncio.wait_for(channel.wait_for_state_change(states[-1]), deadline - loop.time())
        except TimeoutError:
            break
        states.append(channel.get_state())
    assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
    return states


def test_a_connection_past_its_maximum_age_is_closed_and_the_next_call_reconnects(inprocess_server):
    settings = TemplateSettings(max_connection_age_s=0.5, max_connection_age_grace_s=1.0)

    async def main():
        async with inprocess_server(template_spec(settings), settings) as server:
            return await _states_after_a_call(server.channel, watch_s=10.0)

    states = asyncio.run(main())
    assert states[0] == grpc.ChannelConnectivity.READY
    assert states[-1] != grpc.ChannelConnectivity.READY, states  # the server sent GOAWAY


def test_with_no_maximum_age_the_connection_stays_open(inprocess_server):
    settings = TemplateSettings(max_connection_age_s=0)

    async def main():
        async with inprocess_server(template_spec(settings), settings) as server:
            return await _states_after_a_call(server.channel, watch_s=2.0)

    assert asyncio.run(main()) == [grpc.ChannelConnectivity.READY]
