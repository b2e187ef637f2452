"""Runs the docker-compose topology as processes on this machine, without Docker.

Redis: the one at ``REDIS_URL`` if set (every service gets that URL), else a
private ``redis-server`` if one is installed, started with deploy/redis/users.acl
so that each service connects as its own user, as in docker-compose; else the
mesh runs without a prompt cache (and says so).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli import redis_acl
from cli.certs import init_certs
from cli.connect import GatewayAccess
from cli.topology import REPO_ROOT, ServiceDef, load_topology, local_environment
from meshkit.redis_connect import redact_url
from meshkit.settings import TLS_DIR_ENV, TRACE_DIR_ENV, default_home
from meshkit.tls import CA_FILE, probe_credentials


def free_port() -> int:
    return distinct_free_ports(1)[0]


def distinct_free_ports(count: int) -> list[int]:
    """``count`` free ports, all different: every socket stays bound until all are picked."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_health(address: str, timeout_s: float = 1.0,
                 credentials: grpc.ChannelCredentials | None = None) -> str:
    """The service's grpc.health.v1 status name, or UNREACHABLE.

    ``credentials``: for a TLS mesh, what the probe presents (meshkit.tls.probe_credentials).
    """
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@dataclass
class LocalMesh:
    run_dir: Path
    free_ports: bool = False
    redis_url: str | None = None  # None: REDIS_URL, else a private redis-server
    extra_env: dict[str, str] = field(default_factory=dict)
    progress: Callable[[str], None] = print
    detach: bool = False
    # TLS at the gateway, mTLS inside, with the certificates in certs_dir (made on start if
    # missing; default $NLPMESH_HOME/certs). Off = plaintext everywhere.
    tls: bool = False
    certs_dir: Path | None = None
    services: list[ServiceDef] = field(default_factory=load_topology)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # Prometheus /metrics per service
    # Full access to the mesh's Redis, for tools and tests ("" = no prompt cache):
    # REDIS_URL, or the private server's admin user. No service gets it.
    resolved_redis_url: str = ""
    redis_urls: dict[str, str] = field(default_factory=dict)  # each Redis-using service's own
    # Auth: with a keys file the gateway checks API keys and gateway_access() sends
    # ``api_key``; without one (tests, bench) the gateway runs with auth off, explicitly.
    keys_file: Path | None = None
    api_key: str | None = None
    _redis: subprocess.Popen | None = None

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.ports['gateway']}"

    def gateway_access(self) -> GatewayAccess:
        """How a client of this mesh reaches its gateway."""
        return GatewayAccess(self.gateway_address, ca_file=self.tls_dir / CA_FILE if self.tls_dir else None,
                             api_key=self.api_key)

    def gateway_auth_env(self) -> dict[str, str]:
        """The gateway's auth settings (for this mesh's gateway and any started beside it)."""
        if self.keys_file is None:
            return {"NLPMESH_GATEWAY_AUTH": "off"}
        return {"NLPMESH_GATEWAY_AUTH": "on", "NLPMESH_GATEWAY_AUTH_KEYS_FILE": str(self.keys_file)}

    @property
    def tls_dir(self) -> Path | None:
        """The mesh's certificates (NLPMESH_TLS_DIR of every service), or None when it runs plaintext."""
        if not self.tls:
            return None
        return self.certs_dir or default_home() / "certs"

    def tls_environment(self) -> dict[str, str]:
        """What points a process at this mesh's certificates; empty values turn TLS off."""
        return {TLS_DIR_ENV: str(self.tls_dir or "")}

    def probe_credentials(self) -> grpc.ChannelCredentials | None:
        return probe_credentials(self.tls_dir)

    @property
    def trace_dir(self) -> Path | None:
        """Where the services write their spans: the caller's NLPMESH_TRACE_DIR, else <run_dir>/traces.

        An empty NLPMESH_TRACE_DIR writes no span files (None).
        """
        chosen = {**os.environ, **self.extra_env}.get(TRACE_DIR_ENV)
        if chosen is None:
            return self.run_dir / "traces"
        return Path(chosen) if chosen else None

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def metrics_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.metrics_ports[service]}/metrics"

    def start(self, ready_timeout_s: float = 600.0) -> LocalMesh:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        picked = iter(distinct_free_ports(2 * len(self.services) if self.free_ports else 0))
        self.ports = {s.name: next(picked) if self.free_ports else s.port for s in self.services}
        self.metrics_ports = {s.name: next(picked) if self.free_ports else s.metrics_port
                              for s in self.services if s.metrics_port or self.free_ports}
        if self.tls_dir is not None:
            report = init_certs(self.tls_dir)
            self.progress(f"tls: certificates in {self.tls_dir}" + (f" (made {', '.join(report.made)})"
                                                                    if report.made else ""))
        self._start_redis()
        for service in self.services:
            self._spawn(service, self.redis_url_for(service.name))
        self.wait_ready(ready_timeout_s)
        return self

    def redis_url_for(self, service: str) -> str:
        """The Redis URL ``service`` connects with ("" for none)."""
        return self.redis_urls.get(service, "")

    def _start_redis(self) -> None:
        url = self.redis_url if self.redis_url is not None else os.environ.get("REDIS_URL")
        if url is not None:
            self.progress(f"redis: using {redact_url(url) or '(none: no prompt cache)'}")
            self.resolved_redis_url = url
            self.redis_urls = dict.fromkeys(redis_acl.SERVICE_USERS, url)
            return
        binary = shutil.which("redis-server")
        if binary is None:
            self.progress("redis: no REDIS_URL and no redis-server installed: running WITHOUT a prompt cache")
            return
        port = free_port()
        users = redis_acl.RedisUsers.make()  # new passwords each run, known only to this mesh
        redis_dir = self.run_dir / "redis"
        redis_dir.mkdir(mode=0o700, exist_ok=True)
        acl_file, _ = redis_acl.write(redis_dir, users, "127.0.0.1", port)
        self._redis = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--aclfile", str(acl_file)],
            stdout=(self.run_dir / "logs" / "redis.log").open("w"), stderr=subprocess.STDOUT,
            start_new_session=self.detach,
        )
        _wait_for_port(port, 10.0)
        self.resolved_redis_url = users.url("admin", "127.0.0.1", port)
        self.redis_urls = {user: users.url(user, "127.0.0.1", port) for user in redis_acl.SERVICE_USERS}
        self.progress(f"redis: private redis-server on 127.0.0.1:{port}, one ACL user per service "
                      f"({acl_file}; passwords in {redis_dir / redis_acl.ENV_FILE})")

    def _spawn(self, service: ServiceDef, redis_url: str) -> None:
        auth_env = self.gateway_auth_env() if service.name == "gateway" else {}
        env = {**os.environ, **local_environment(service, self.ports, redis_url, self.metrics_ports),
               **self.tls_environment(), **auth_env, **self.extra_env, "PYTHONUNBUFFERED": "1",
               TRACE_DIR_ENV: str(self.trace_dir or "")}
        # Spans reach the files within 0.2 s, so `nlpmesh trace --last` sees the request just made.
        env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")
        command = [sys.executable if part == "python" else part for part in service.command]
        log = (self.run_dir / "logs" / f"{service.name}.log").open("w")
        self.processes[service.name] = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=self.detach,
        )
        pid = self.processes[service.name].pid
        self.progress(f"{service.name}: started (pid {pid}, port {self.ports[service.name]})")

    def wait_ready(self, timeout_s: float) -> None:
        """Waits until every service is SERVING, showing progress while the model loads."""
        deadline = time.monotonic() + timeout_s
        waiting = [s.name for s in self.services]
        last_note = 0.0
        started = time.monotonic()
        credentials = self.probe_credentials()
        while waiting:
            for name in list(waiting):
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with code {self.processes[name].returncode}; "
                                       f"see {self.log_path(name)}:\n{self.log_tail(name)}")
                if check_health(self.address(name), 0.5, credentials) == "SERVING":
                    waiting.remove(name)
                    self.progress(f"{name}: SERVING after {time.monotonic() - started:.1f}s")
            if waiting and time.monotonic() - last_note > 3.0:
                last_note = time.monotonic()
                self.progress(f"waiting for {', '.join(waiting)}: {self._latest_line(waiting[-1])}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:.0f}s: {', '.join(waiting)}")
            if waiting:
                time.sleep(0.2)

    def log_path(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.log_path(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _latest_line(self, name: str) -> str:
        tail = self.log_tail(name, 1)
        return tail[-100:] if tail else "starting"

    def stop(self, grace_s: float = 10.0) -> None:
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in list(self.processes.values()) + ([self._redis] if self._redis else []):
            if process is self._redis and process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def save_state(self, path: Path) -> None:
        pids = {name: p.pid for name, p in self.processes.items()}
        if self._redis is not None:
            pids["redis"] = self._redis.pid
        path.write_text(json.dumps({"gateway": self.gateway_address, "pids": pids, "ports": self.ports,
                                    "metrics_ports": self.metrics_ports,
                                    "tls_dir": str(self.tls_dir) if self.tls_dir else None}))

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_detached(state_file: Path, grace_s: float = 10.0) -> list[str]:
    """Stops a mesh started with ``up --detach``; returns the names stopped."""
    state = json.loads(state_file.read_text())
    stopped = []
    for name, pid in reversed(list(state["pids"].items())):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(name)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + grace_s
    for pid in state["pids"].values():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    state_file.unlink()
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"redis-server did not open port {port}")

