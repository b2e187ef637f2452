"""A real in-process grpc.aio server on a free port, with a real channel to it."""
from __future__ import annotations

from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass

import grpc
import pytest

from meshkit.server import SERVING, ServiceSpec, create_server
from meshkit.settings import ServiceSettings
from tests.in_process import in_process_only


@dataclass
class RunningServer:
    spec: ServiceSpec
    channel: grpc.aio.Channel
    health: object  # grpc_health's aio HealthServicer
    address: str = ""

    async def warm_up(self) -> None:
        """What serve() does once the port is open: warm up, then report SERVING."""
        if self.spec.warm_up is not None:
            await self.spec.warm_up()
        for name in ("",) + self.spec.service_names:
            await self.health.set(name, SERVING)


@asynccontextmanager
async def _inprocess_server(spec: ServiceSpec, settings: ServiceSettings, *, warm: bool = True):
    server, port, health = await create_server(spec, settings.model_copy(update={"port": 0}))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    running = RunningServer(spec, channel, health, f"127.0.0.1:{port}")
    try:
        if warm:
            await running.warm_up()
        yield running
    finally:
        await channel.close()
        await server.stop(None)
        if spec.close is not None:
            await spec.close()


@pytest.fixture
def inprocess_server():
    """``async with inprocess_server(spec, settings, warm=True) as running: ...``

    ``warm=False`` leaves the server NOT_SERVING until ``await running.warm_up()``.
    """
    return _inprocess_server


def _in_process(item) -> bool:
    """A servicer test not marked redis or model keeps to the in-process rule (tests/in_process.py)."""
    return not (item.get_closest_marker("redis") or item.get_closest_marker("model"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with in_process_only("an unmarked tests/servicer test") if _in_process(item) else nullcontext():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with in_process_only("an unmarked tests/servicer test") if _in_process(item) else nullcontext():
        return (yield)
