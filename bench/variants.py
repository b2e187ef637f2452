"""A second gateway beside a running mesh, with other settings: A/B in one run."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cli.certs import init_certs
from cli.launcher import LocalMesh, check_health, free_port
from cli.topology import REPO_ROOT, local_environment
from meshkit.grpc_io import with_mesh_grpc_io
from meshkit.settings import TRACE_DIR_ENV
from meshkit.tls import CA_FILE


def spawn_gateway(mesh: LocalMesh, env: dict[str, str], timeout_s: float = 60.0,
                  source: Path = REPO_ROOT, health_credentials=None) -> tuple[subprocess.Popen, str]:
    """Starts one more gateway on the mesh's services; returns (process, address) once SERVING.

    ``source``: the checkout the gateway's code comes from (another commit's
    worktree, with its own ``make protos``), to compare a change against its
    parent in one run. ``health_credentials``: what the readiness check presents to a
    gateway that serves TLS (default: the mesh's probe certificate, or plaintext).
    """
    gateway = next(s for s in mesh.services if s.name == "gateway")
    port = free_port()
    # The same environment as the mesh's own gateway (span files, flushed as often
    # as the launcher has them), less its metrics endpoint, plus the variant's settings.
    variant_env = {**os.environ, **local_environment(gateway, dict(mesh.ports, gateway=port),
                                                        mesh.redis_url_for(gateway.name)),
                   **mesh.tls_environment(), TRACE_DIR_ENV: str(mesh.trace_dir or ""), **mesh.gateway_auth_env(), **env}
    variant_env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")
    with_mesh_grpc_io(variant_env)  # as the launcher starts the mesh's own, unless the variant names its own
    if source != REPO_ROOT:
        variant_env["PYTHONPATH"] = os.pathsep.join((str(source), str(source / "gen")))
    process = subprocess.Popen([sys.executable, "-m", _gateway_module(source)], cwd=source, env=variant_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    credentials = health_credentials or mesh.probe_credentials()
    while check_health(address, 1.0, credentials) != "SERVING":
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"gateway variant {env} did not start")
        time.sleep(0.2)
    return process, address


def _gateway_module(source: Path) -> str:
    # The gateway was ``services.gateway`` for a while; before and after that it is the top-level ``gateway``.
    return "services.gateway" if (source / "services" / "gateway").is_dir() else "gateway"


def tls_edge_variant(certs: Path) -> tuple[dict[str, str], Path]:
    """The default gateway, serving TLS to its callers with the mesh's certificate (the CA is
    not given, so it calls the mesh's plaintext services as the default gateway does):
    the environment, and the CA a client verifies it with."""
    init_certs(certs)
    env = {"NLPMESH_GATEWAY_TLS_CERT_FILE": str(certs / "gateway.crt"),
           "NLPMESH_GATEWAY_TLS_KEY_FILE": str(certs / "gateway.key")}
    return env, certs / CA_FILE
