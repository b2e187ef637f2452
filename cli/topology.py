"""The mesh's topology, read from docker-compose.yml so that local processes and
containers run the same services with the same settings."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
_ADDRESS = re.compile(r"^([a-z][a-z0-9_-]*):(\d+)$")
_URL_HOST = re.compile(r"^[a-z]+://([a-z][a-z0-9_-]*):\d+")


@dataclass(frozen=True)
class ServiceDef:
    name: str
    command: tuple[str, ...]
    environment: dict[str, str]
    port: int
    depends_on: tuple[str, ...]
    metrics_port: int = 0  # Prometheus /metrics; 0 = none


def load_topology(compose_file: Path = COMPOSE_FILE) -> list[ServiceDef]:
    """The mesh's gRPC services in start order.

    Redis is handled apart; the other infrastructure (collector, Jaeger,
    Prometheus) has no NLPMESH_<NAME>_PORT and is not run locally.
    """
    document = yaml.safe_load(compose_file.read_text())
    services = []
    for name, spec in document["services"].items():
        environment = {k: str(v) for k, v in (spec.get("environment") or {}).items()}
        if f"NLPMESH_{name.upper()}_PORT" not in environment:
            continue
        port = int(environment[f"NLPMESH_{name.upper()}_PORT"])
        metrics_port = int(environment.get(f"NLPMESH_{name.upper()}_METRICS_PORT", 0))
        services.append(ServiceDef(name, tuple(spec["command"]), environment, port,
                                   tuple(spec.get("depends_on") or ()), metrics_port))
    return _start_order(services)


def _start_order(services: list[ServiceDef]) -> list[ServiceDef]:
    ordered: list[ServiceDef] = []
    pending = list(services)
    while pending:
        placed = {s.name for s in ordered} | {"redis"}
        ready = [s for s in pending if set(s.depends_on) <= placed]
        if not ready:
            raise ValueError(f"docker-compose.yml: circular depends_on among {[s.name for s in pending]}")
        ordered += ready
        pending = [s for s in pending if s not in ready]
    return ordered


def local_environment(service: ServiceDef, ports: dict[str, int], redis_url: str,
                      metrics_ports: dict[str, int] | None = None) -> dict[str, str]:
    """The service's compose environment, rewritten for processes on this machine.

    Without ``metrics_ports`` the service gets no /metrics endpoint, so an extra
    process started beside a mesh never fights it for the compose port.
    """
    env: dict[str, str] = {}
    for key, value in service.environment.items():
        url_host = _URL_HOST.match(value)
        if key.startswith("OTEL_") and (url_host is None or url_host.group(1) not in ports):
            continue  # points at compose infrastructure that does not run locally
        if key == "NLPMESH_TLS_DIR":
            continue  # a path inside the containers; the launcher sets its own (LocalMesh.tls_environment)
        match = _ADDRESS.match(value)
        if key.endswith("_HOST"):
            value = "127.0.0.1"
        elif key == f"NLPMESH_{service.name.upper()}_PORT":
            value = str(ports[service.name])
        elif key == f"NLPMESH_{service.name.upper()}_METRICS_PORT":
            value = str((metrics_ports or {}).get(service.name, 0))
        elif key == "REDIS_URL":
            value = redis_url
        elif match and match.group(1) in ports:
            value = f"127.0.0.1:{ports[match.group(1)]}"
        env[key] = value
    return env
