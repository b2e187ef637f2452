"""The whole mesh as real processes: the gRPC services, the edge, a private Redis, the real models."""
from __future__ import annotations

import signal

import grpc
import pytest
from nlpmesh.gateway.v1 import gateway_pb2_grpc

from cli.launcher import LocalMesh
from tests.budget_policy import ENV as BUDGETS_ENV
from tests.budget_policy import roomy_budgets
from tests.conftest import running_redis_server
from tests.launched import Launched, own_home


@pytest.fixture(scope="module")
def mesh_redis():
    with running_redis_server() as server:
        yield server


def started_mesh(run_dir, redis_url: str) -> LocalMesh:
    """The mesh with the shipped budgets' cache, template and tokenizer hops made roomy: its tests are
    about answers, caching and telemetry, and a hop over budget on a loaded machine is not (budgets:
    ``tests/e2e/test_budgets.py``)."""
    local = LocalMesh(run_dir, free_ports=True, redis_url=redis_url, extra_env={BUDGETS_ENV: str(roomy_budgets())},
                      progress=lambda line: print(f"[mesh] {line}"))
    local.start(ready_timeout_s=300)
    return local


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, mesh_redis):
    local = started_mesh(tmp_path_factory.mktemp("mesh"), mesh_redis.url)
    yield local
    local.stop()


def started_tls_mesh(tmp_path_factory, redis_url: str, extra_env: dict[str, str] | None = None) -> LocalMesh:
    """The mesh `nlpmesh up` runs: TLS at the gateway, mTLS inside, with certificates `nlpmesh certs init`
    makes in a folder of its own."""
    local = LocalMesh(tmp_path_factory.mktemp("tls-mesh"), free_ports=True, redis_url=redis_url,
                      tls=True, certs_dir=tmp_path_factory.mktemp("certs"), extra_env=extra_env or {},
                      progress=lambda line: print(f"[tls-mesh] {line}"))
    local.start(ready_timeout_s=300)
    return local


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory, mesh_redis):
    local = started_tls_mesh(tmp_path_factory, mesh_redis.url)
    yield local
    local.stop()


@pytest.fixture
def own_mesh(tmp_path, disposable_redis_server):
    """A mesh and a Redis (``disposable_redis_server``) for one test, which may stop either."""
    local = started_mesh(tmp_path / "mesh", disposable_redis_server.url)
    yield local
    local.stop()


@pytest.fixture(scope="module")
def gateway(mesh):
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """A mesh of the module's own from `nlpmesh up` (TLS, API keys), in a home of its own; SIGTERM ends it."""
    mesh = Launched(own_home(tmp_path_factory.mktemp("home")))
    try:
        yield mesh.up()
        mesh.process.send_signal(signal.SIGTERM)
        mesh.process.wait(timeout=60)
    finally:
        mesh.kill_everything()
