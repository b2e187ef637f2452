"""The mesh's topology, read from docker-compose.yml so that local processes and
containers run the same services with the same settings."""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
_ADDRESS = re.compile(r"^(?:dns:///)?([a-z][a-z0-9_-]*):(\d+)$")
# Local replicas of a service (`nlpmesh up --scale inference=2`): replica i (from 2) is "<service>-<i>",
# on the service's ports plus REPLICA_PORT_STEP * (i - 1) when the compose ports are used.
REPLICA_PORT_STEP = 10
INFERENCE = "inference"  # the service that runs one model per process
MAX_REPLICAS = 8
_URL_HOST = re.compile(r"^[a-z]+://([a-z][a-z0-9_-]*):\d+")


@dataclass(frozen=True)
class ServiceDef:
    name: str
    command: tuple[str, ...]
    environment: dict[str, str]
    port: int
    depends_on: tuple[str, ...]
    metrics_port: int = 0  # Prometheus /metrics; 0 = none
    # The service it runs, whose NLPMESH_<KIND>_* settings it reads: its name, or "inference" for a
    # per-model compose service "inference-<model id>"; and that model (its NLPMESH_<KIND>_MODEL).
    kind: str = ""
    model: str = ""


# compose's Redis starts as a shell that hands the redis user its key, then runs redis-server as that user.
_AS_REDIS = ("exec", "su-exec", "redis")


def compose_redis_server_args(compose_file: Path = COMPOSE_FILE) -> list[str]:
    """The redis-server command line compose's Redis runs (``${...}`` left as written); the Kubernetes base runs
    the same one."""
    return redis_server_args(yaml.safe_load(compose_file.read_text())["services"]["redis"]["command"])


def redis_server_args(command: list[str]) -> list[str]:
    """The redis-server command line of compose's Redis ``command``."""
    words = shlex.split(command[-1])
    starts = [i for i in range(len(words)) if tuple(words[i:i + 3]) == _AS_REDIS]
    if command[:2] != ["sh", "-c"] or len(command) != 3 or len(starts) != 1:
        raise ValueError("redis's command must be sh -c '... && exec su-exec redis redis-server ...'")
    return words[starts[0] + 3:]


def compose_services(compose_file: Path = COMPOSE_FILE) -> list[ServiceDef]:
    """Every gRPC service of the compose file as compose runs it, one per compose service.

    Redis and the other infrastructure (collector, Jaeger, Prometheus) have no
    NLPMESH_<NAME>_PORT and are left out.
    """
    document = yaml.safe_load(compose_file.read_text())
    services = []
    for name, spec in document["services"].items():
        environment = {k: str(v) for k, v in (spec.get("environment") or {}).items()}
        kind = _kind(name, environment)
        if kind is None:
            continue
        prefix = f"NLPMESH_{kind.upper()}_"
        services.append(ServiceDef(
            name, tuple(spec["command"]), environment, int(environment[prefix + "PORT"]),
            tuple(spec.get("depends_on") or ()), int(environment.get(prefix + "METRICS_PORT", 0)),
            kind, environment.get(prefix + "MODEL", "")))
    return services


def _kind(name: str, environment: dict[str, str]) -> str | None:
    """The service a compose service runs: its name, or ``<kind>`` for ``<kind>-<model>`` serving that model."""
    if f"NLPMESH_{name.upper()}_PORT" in environment:
        return name
    kind, _, model = name.partition("-")
    if model and environment.get(f"NLPMESH_{kind.upper()}_MODEL") == model and \
            f"NLPMESH_{kind.upper()}_PORT" in environment:
        return kind
    return None


def load_topology(compose_file: Path = COMPOSE_FILE) -> list[ServiceDef]:
    """The processes the launcher runs, in start order: one per kind of service, named after it.

    Of the per-model inference services it runs the first compose lists (the default model's);
    the gateway then reaches that one process (local_environment) and learns its model from it.
    """
    every = compose_services(compose_file)
    kind_of = {service.name: service.kind for service in every}
    first: dict[str, ServiceDef] = {}
    for service in every:
        first.setdefault(service.kind, service)
    return _start_order([replace(s, name=s.kind,
                                 depends_on=tuple(dict.fromkeys(kind_of.get(d, d) for d in s.depends_on)))
                         for s in first.values()])


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


def replica_names(service: str, count: int) -> list[str]:
    """The process names of ``count`` replicas of ``service``: the first keeps the service's name."""
    return [service if i == 1 else f"{service}-{i}" for i in range(1, count + 1)]


def replica_addresses(ports: dict[str, int], service: str) -> str:
    """How a client reaches every local replica of ``service``: one address, or an ``ipv4:`` list
    that the gateway's channel balances (gateway/balancing.py)."""
    return addresses_of(ports, _replicas_in(ports, service))


def addresses_of(ports: dict[str, int], names: list[str]) -> str:
    """How a client reaches the local processes ``names``: one address, or an ``ipv4:`` list."""
    endpoints = [f"127.0.0.1:{ports[name]}" for name in names]
    return endpoints[0] if len(endpoints) == 1 else "ipv4:" + ",".join(endpoints)


def model_replica_names(index: int, model: str, count: int) -> list[str]:
    """The inference processes of the ``index``-th model served: the first model's keep the service's
    names (inference, inference-2, ...), so a mesh of one model is named as before; another's are
    inference-<id>, inference-<id>-2, ..."""
    return replica_names(INFERENCE if index == 0 else f"{INFERENCE}-{model}", count)


def model_environment(service: str, instance: str, models: dict[str, list[str]], ports: dict[str, int]
                      ) -> dict[str, str]:
    """What tells ``instance`` of ``service`` which models it serves or routes to; ``models``: each model's
    inference processes, the default model first."""
    if service == INFERENCE:
        return {"NLPMESH_INFERENCE_MODEL": next(m for m, names in models.items() if instance in names)}
    if service == "gateway":
        return {"NLPMESH_GATEWAY_INFERENCE_ADDRS": json.dumps({m: addresses_of(ports, n) for m, n in models.items()}),
                "NLPMESH_GATEWAY_DEFAULT_MODEL": next(iter(models))}
    if service == "tokenizer":
        return {"NLPMESH_TOKENIZER_MODELS": ",".join(models)}
    return {}


def _replicas_in(ports: dict[str, int], service: str) -> list[str]:
    names = [service]
    while f"{service}-{len(names) + 1}" in ports:
        names.append(f"{service}-{len(names) + 1}")
    return names


def local_environment(service: ServiceDef, ports: dict[str, int], redis_url: str,
                      metrics_ports: dict[str, int] | None = None, instance: str | None = None) -> dict[str, str]:
    """The service's compose environment, rewritten for processes on this machine.

    Without ``metrics_ports`` the service gets no /metrics endpoint, so an extra
    process started beside a mesh never fights it for the compose port. ``instance``:
    which replica (``inference-2``; default the first, named as the service); ``ports``
    holds every replica's port, and an address of a replicated service lists them all.
    """
    instance = instance or service.name
    env: dict[str, str] = {}
    for key, value in service.environment.items():
        url_host = _URL_HOST.match(value)
        if key.startswith("OTEL_") and (url_host is None or url_host.group(1) not in ports):
            continue  # points at compose infrastructure that does not run locally
        if key == "NLPMESH_TLS_DIR":
            continue  # a path inside the containers; the launcher sets its own (LocalMesh.tls_environment)
        match = _ADDRESS.match(value)
        if key.endswith("_ADDRS"):
            # A map of per-model services ({model: address}): locally one process of that kind runs
            # (load_topology), reached at one address; the gateway learns its model from it.
            kind = key.removeprefix(f"NLPMESH_{service.name.upper()}_").removesuffix("_ADDRS").lower()
            env[key.removesuffix("S")] = replica_addresses(ports, kind)
            continue
        if key.endswith("_HOST"):
            value = "127.0.0.1"
        elif key == f"NLPMESH_{service.name.upper()}_PORT":
            value = str(ports[instance])
        elif key == f"NLPMESH_{service.name.upper()}_METRICS_PORT":
            value = str((metrics_ports or {}).get(instance, 0))
        elif key == "REDIS_URL":
            value = redis_url
        elif match and match.group(1) in ports:
            value = replica_addresses(ports, match.group(1))
        env[key] = value
    return env
