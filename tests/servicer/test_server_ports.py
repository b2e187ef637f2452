"""One port, one process: a server of the mesh does not bind a port another server serves."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from meshkit.ports import PortInUse
from meshkit.server import ServiceSpec, create_server
from meshkit.settings import ServiceSettings


def bare_spec(name: str) -> ServiceSpec:
    return ServiceSpec(name=name, service_names=(), register=lambda server: None)


def test_a_second_server_on_a_served_port_is_refused_naming_the_port():
    async def scenario():
        first, port, _ = await create_server(bare_spec("first"), ServiceSettings(port=0))
        try:
            with pytest.raises(PortInUse, match=f"second: 127.0.0.1:{port} is in use by another process"):
                await create_server(bare_spec("second"), ServiceSettings(port=port))
            # And the first still serves the port alone.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 5)
        finally:
            await first.stop(None)

    asyncio.run(scenario())
