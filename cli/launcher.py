"""Runs the docker-compose topology as processes on this machine, without Docker.

Redis: the one at ``REDIS_URL`` if set (every service gets that URL), else a
private ``redis-server`` if one is installed, started with deploy/redis/users.acl
so that each service connects as its own user, as in docker-compose, and bounded
to ``NLPMESH_REDIS_MAXMEMORY`` with LRU eviction; else the mesh runs without a
prompt cache (and says so).

Every process the mesh starts gets SIGTERM when the thread that started it ends
(Linux's parent-death signal), so a launcher killed outright leaves nothing
behind. With a ``restart`` policy, ``supervise()`` restarts a process that exited,
with backoff, as compose's ``restart: unless-stopped`` does.

A port is owned by one process: the mesh does not start while another process holds one of its
ports (another mesh on the same ports, say), and a service that exits because its port is taken
(``PORT_IN_USE_EXIT``) is not restarted: ``PortTaken`` says which.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli import redis_acl
from cli.certs import init_certs
from cli.connect import GatewayAccess
from cli.processes import die_with_this_thread, start_time
from cli.restarts import Backoff, RestartPolicy
from cli.topology import (
    INFERENCE,
    MAX_REPLICAS,
    REPLICA_PORT_STEP,
    REPO_ROOT,
    ServiceDef,
    load_topology,
    local_environment,
    model_environment,
    model_replica_names,
    replica_names,
)
from gateway.health_names import model_health_name
from meshkit.grpc_io import with_mesh_grpc_io
from meshkit.ports import port_in_use
from meshkit.redis_connect import redact_url
from meshkit.server import LAUNCHER_PID_ENV, PORT_IN_USE_EXIT
from meshkit.settings import TLS_DIR_ENV, TRACE_DIR_ENV, default_home
from meshkit.tls import CA_FILE, probe_credentials
from modelfiles.catalogue import load_catalogue
from modelfiles.convert import converted_revision

EDGE = "edge"  # the OpenAI-compatible HTTP edge: checked by its /healthz, not grpc.health.v1
EMBEDDING = "embedding"  # the embedding replicas: left out when the catalogue has no embedding model


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


DEFAULT_REDIS_MAXMEMORY = "256mb"


class PortTaken(RuntimeError):
    """Another process holds a port of the mesh: nothing is started, or the process that needs it is not
    restarted."""


def check_health(address: str, timeout_s: float = 1.0,
                 credentials: grpc.ChannelCredentials | None = None, service: str = "") -> str:
    """The grpc.health.v1 status name of ``service`` ("" = the server as a whole) at ``address``,
    UNREACHABLE, or UNKNOWN_SERVICE_NAME when the server does not know that name.

    ``credentials``: for a TLS mesh, what the probe presents (meshkit.tls.probe_credentials).
    """
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout_s)
        except grpc.RpcError as error:
            return "UNKNOWN_SERVICE_NAME" if error.code() == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def check_http_health(url: str, timeout_s: float = 1.0, ca_file: Path | None = None) -> str:
    """SERVING when GET ``url`` (an HTTP service's /healthz, e.g. the OpenAI edge's) answers 200, NOT_SERVING on
    another status, UNREACHABLE when nothing answers. An https URL is verified with ``ca_file`` (the mesh CA)."""
    verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
    try:
        reply = httpx.get(url, timeout=timeout_s, verify=verify)
    except httpx.HTTPError:
        return "UNREACHABLE"
    return "SERVING" if reply.status_code == 200 else "NOT_SERVING"


@dataclass
class LocalMesh:
    run_dir: Path
    free_ports: bool = False
    redis_url: str | None = None  # None: REDIS_URL, else a private redis-server
    extra_env: dict[str, str] = field(default_factory=dict)
    progress: Callable[[str], None] = print
    # None: a process that exits stays down (tests that stop one on purpose); else supervise() restarts it.
    restart: RestartPolicy | None = None
    # Called after every process start or restart, e.g. to rewrite the state file with the new pid.
    on_change: Callable[[], None] | None = None
    # The private redis-server's maxmemory (redis-server syntax: 256mb, 2gb); evicts least recently used keys.
    redis_maxmemory: str = field(
        default_factory=lambda: os.environ.get("NLPMESH_REDIS_MAXMEMORY") or DEFAULT_REDIS_MAXMEMORY)
    # TLS at the gateway, mTLS inside, with the certificates in certs_dir (made on start if
    # missing; default $NLPMESH_HOME/certs). Off = plaintext everywhere.
    tls: bool = False
    certs_dir: Path | None = None
    services: list[ServiceDef] = field(default_factory=load_topology)
    # Replicas per service (`nlpmesh up --scale inference=2`); 1 for any not named. Replica i (from 2)
    # runs as "<service>-<i>" on ports of its own, and the gateway's address of the service lists them all.
    # For inference: replicas per model.
    scale: dict[str, int] = field(default_factory=dict)
    # The catalogue ids served, the default first, each by inference processes of its own (inference for
    # the first, inference-<id> for another); empty = the catalogue's default model only.
    models: tuple[str, ...] = ()
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # by process name (inference-2)
    ports: dict[str, int] = field(default_factory=dict)  # by process name
    metrics_ports: dict[str, int] = field(default_factory=dict)  # Prometheus /metrics per process
    # Full access to the mesh's Redis, for tools and tests ("" = no prompt cache):
    # REDIS_URL, or the private server's admin user. No service gets it.
    resolved_redis_url: str = ""
    redis_urls: dict[str, str] = field(default_factory=dict)  # each Redis-using service's own
    # Auth: with a keys file the gateway checks API keys and gateway_access() sends
    # ``api_key``; without one (tests, bench) the gateway runs with auth off, explicitly.
    keys_file: Path | None = None
    api_key: str | None = None
    _redis: subprocess.Popen | None = None
    _redis_command: list[str] = field(default_factory=list)
    _started_at: dict[str, float] = field(default_factory=dict)  # monotonic, per process name
    _backoff: dict[str, Backoff] = field(default_factory=dict)
    _restart_due: dict[str, float] = field(default_factory=dict)
    _awaiting_serving: dict[str, float] = field(default_factory=dict)  # restarted, not yet SERVING again
    _stopping: bool = False
    _given_up: set[str] = field(default_factory=set)  # exited, not to be restarted (their port is taken)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _supervisor: threading.Thread | None = None

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

    def edge_url(self, name: str = EDGE) -> str:
        """The OpenAI-compatible edge's base URL (https when the mesh runs TLS)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.ports[name]}"

    def health(self, name: str, timeout_s: float, credentials: grpc.ChannelCredentials | None) -> str:
        """A process's health: grpc.health.v1 of a gRPC service, /healthz of the HTTP edge."""
        if self.instances[name].name == EDGE:
            return check_http_health(f"{self.edge_url(name)}/healthz", timeout_s,
                                     self.tls_dir / CA_FILE if self.tls_dir else None)
        return check_health(self.address(name), timeout_s, credentials)

    def metrics_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.metrics_ports[service]}/metrics"

    @property
    def model_instances(self) -> dict[str, list[str]]:
        """Each model served (the default first): the names of its inference processes."""
        catalogue = load_catalogue()
        models = self.models or catalogue.ids[:1]
        unknown = [model for model in models if model not in catalogue.ids]
        if unknown or len(set(models)) != len(models):
            raise ValueError(f"--model: {', '.join(unknown) or 'a model named twice'}; the catalogue "
                             f"({catalogue.path}) has {', '.join(catalogue.ids)}")
        count = self.scale.get(INFERENCE, 1)
        return {model: model_replica_names(index, model, count) for index, model in enumerate(models)}

    @property
    def instances(self) -> dict[str, ServiceDef]:
        """Every process of the mesh, by name, in start order: each service's replicas together."""
        unknown = set(self.scale) - {s.name for s in self.services}
        if unknown:
            raise ValueError(f"--scale: no service {', '.join(sorted(unknown))} in docker-compose.yml")
        instances = {}
        for service in self.services:
            if service.name == EMBEDDING and self.embedding_model is None:
                continue  # no embedding model to serve here: no embedding process, Embed answers NOT_FOUND
            count = self.scale.get(service.name, 1)
            if not 1 <= count <= MAX_REPLICAS:
                raise ValueError(f"--scale {service.name}={count}: between 1 and {MAX_REPLICAS} replicas")
            names = (replica_names(service.name, count) if service.name != INFERENCE
                     else [name for names in self.model_instances.values() for name in names])
            instances.update(dict.fromkeys(names, service))
        return instances

    @property
    def embedding_model(self) -> str | None:
        """The catalogue's embedding model when it is unpacked here (make setup), else None."""
        ids = load_catalogue().embedding_ids
        home = Path({**os.environ, **self.extra_env}.get("NLPMESH_HOME") or default_home())
        return ids[0] if ids and converted_revision(home, ids[0]) is not None else None

    def embedding_environment(self, service: str) -> dict[str, str]:
        """The gateway of a mesh without embedding processes reaches none (Embed answers NOT_FOUND)."""
        return {"NLPMESH_GATEWAY_EMBEDDING_ADDR": ""} if service == "gateway" and EMBEDDING not in self.ports else {}

    def replicas(self, service: str) -> list[str]:
        """The process names of ``service``'s replicas (``inference``, ``inference-2``, ...)."""
        return [name for name, s in self.instances.items() if s.name == service]

    def start(self, ready_timeout_s: float = 600.0) -> LocalMesh:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        instances = self.instances
        picked = iter(distinct_free_ports(2 * len(instances) if self.free_ports else 0))
        self.ports, self.metrics_ports = {}, {}
        for name, service in instances.items():
            step = REPLICA_PORT_STEP * self.replicas(service.name).index(name)
            self.ports[name] = next(picked) if self.free_ports else service.port + step
            if self.free_ports:
                self.metrics_ports[name] = next(picked)
            elif service.metrics_port:
                self.metrics_ports[name] = service.metrics_port + step
        self._ensure_ports_free()
        if self.tls_dir is not None:
            report = init_certs(self.tls_dir)
            self.progress(f"tls: certificates in {self.tls_dir}" + (f" (made {', '.join(report.made)})"
                                                                    if report.made else ""))
        embedding_ids = load_catalogue().embedding_ids
        if EMBEDDING not in instances and embedding_ids:
            self.progress(f"embedding: {embedding_ids[0]} is not unpacked (make setup): no embedding replica, "
                          "Embed answers NOT_FOUND")
        self._start_redis()
        for name, service in instances.items():
            self._spawn(service, self.redis_url_for(service.name), instance=name)
        self.wait_ready(ready_timeout_s)
        return self

    def _ensure_ports_free(self) -> None:
        """PortTaken, before anything starts (or any log is rewritten), when a process listens on a port of the
        mesh: another mesh on the same ports, most likely."""
        wanted = {**self.ports, **{f"{name} metrics": port for name, port in self.metrics_ports.items()}}
        taken = [f"{name} (port {port})" for name, port in wanted.items() if port_in_use(f"127.0.0.1:{port}")]
        if taken:
            raise PortTaken(f"in use by another process: {', '.join(taken)}; is another mesh running on these "
                            "ports (`nlpmesh down` in its NLPMESH_HOME), or use --free-ports")

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
        taken = {*self.ports.values(), *self.metrics_ports.values()}  # picked (and released) or fixed
        port = next(port for port in distinct_free_ports(len(taken) + 1) if port not in taken)  # one at least
        users = redis_acl.RedisUsers.make()  # new passwords each run, known only to this mesh
        redis_dir = self.run_dir / "redis"
        redis_dir.mkdir(mode=0o700, exist_ok=True)
        acl_file, _ = redis_acl.write(redis_dir, users, "127.0.0.1", port)
        self._redis_command = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--aclfile", str(acl_file), "--maxmemory", self.redis_maxmemory, "--maxmemory-policy", "allkeys-lru"]
        self._spawn_redis()
        _wait_for_port(port, 10.0)
        self.resolved_redis_url = users.url("admin", "127.0.0.1", port)
        self.redis_urls = {user: users.url(user, "127.0.0.1", port) for user in redis_acl.SERVICE_USERS}
        self.progress(f"redis: private redis-server on 127.0.0.1:{port}, one ACL user per service "
                      f"({acl_file}; passwords in {redis_dir / redis_acl.ENV_FILE}), "
                      f"maxmemory {self.redis_maxmemory} (allkeys-lru)")

    def _spawn_redis(self, restarted: bool = False) -> None:
        self._redis = subprocess.Popen(
            die_with_this_thread(self._redis_command), stdout=self._log_file("redis", restarted),
            stderr=subprocess.STDOUT,
        )
        self._started("redis", self._redis)

    def _log_file(self, name: str, restarted: bool):
        """The process's log: new at the mesh's start, appended to on a restart so the crash stays readable."""
        if not restarted:
            return self.log_path(name).open("w")
        log = self.log_path(name).open("a")
        log.write(f"--- restarted by the launcher at {time.strftime('%H:%M:%S')} ---\n")
        log.flush()
        return log

    def _started(self, name: str, process: subprocess.Popen) -> None:
        self._started_at[name] = time.monotonic()
        if self.on_change is not None:
            self.on_change()

    def _spawn(self, service: ServiceDef, redis_url: str, restarted: bool = False, instance: str | None = None) -> None:
        instance = instance or service.name
        auth_env = self.gateway_auth_env() if service.name == "gateway" else {}
        env = {**os.environ, **local_environment(service, self.ports, redis_url, self.metrics_ports, instance),
               **model_environment(service.name, instance, self.model_instances, self.ports),
               **self.tls_environment(), **auth_env, **self.embedding_environment(service.name), **self.extra_env,
               "PYTHONUNBUFFERED": "1",
               TRACE_DIR_ENV: str(self.trace_dir or ""), LAUNCHER_PID_ENV: str(os.getpid())}
        # Spans reach the files within 0.2 s, so `nlpmesh trace --last` sees the request just made.
        env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")
        with_mesh_grpc_io(env)  # read by gRPC at import: set before the process starts
        command = [sys.executable if part == "python" else part for part in service.command]
        self.processes[instance] = process = subprocess.Popen(
            die_with_this_thread(command), cwd=REPO_ROOT, env=env, stdout=self._log_file(instance, restarted),
            stderr=subprocess.STDOUT,
        )
        self.progress(f"{instance}: {'restarted' if restarted else 'started'} "
                      f"(pid {process.pid}, port {self.ports[instance]})")
        self._started(instance, process)

    def wait_ready(self, timeout_s: float) -> None:
        """Waits until every service is SERVING, showing progress while the model loads."""
        deadline = time.monotonic() + timeout_s
        waiting = list(self.processes)
        last_note = 0.0
        started = time.monotonic()
        credentials = self.probe_credentials()
        while waiting:
            for name in list(waiting):
                if self.processes[name].poll() is not None:
                    error = PortTaken if self.processes[name].returncode == PORT_IN_USE_EXIT else RuntimeError
                    raise error(f"{name} exited with code {self.processes[name].returncode}; "
                                f"see {self.log_path(name)}:\n{self.log_tail(name)}")
                if self.health(name, 0.5, credentials) == "SERVING":
                    waiting.remove(name)
                    self.progress(f"{name}: SERVING after {time.monotonic() - started:.1f}s")
            if waiting and time.monotonic() - last_note > 3.0:
                last_note = time.monotonic()
                self.progress(f"waiting for {', '.join(waiting)}: {self._latest_line(waiting[-1])}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:.0f}s: {', '.join(waiting)}")
            if waiting:
                time.sleep(0.2)
        self._wait_for_models(deadline, credentials)

    def _wait_for_models(self, deadline: float, credentials: grpc.ChannelCredentials | None) -> None:
        """Waits until the gateway serves every model: it turns SERVING with the default one, and serves each
        other from its first ModelInfo answer (gateway/model_routes.py), moments after that model's process is
        SERVING."""
        if "gateway" not in self.processes:
            return
        waiting = list(self.model_instances)
        while waiting:
            waiting = [m for m in waiting if check_health(self.gateway_address, 0.5, credentials,
                                                          model_health_name(m)) != "SERVING"]
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"the gateway does not serve {', '.join(waiting)}; see {self.log_path('gateway')}")
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

    def supervise(self) -> None:
        """One round of `restart: unless-stopped`: a process that exited is restarted after its backoff.

        Call it every fraction of a second (``supervise_in_background`` does), from a thread
        that lives as long as the mesh: the processes it restarts die with that thread.
        """
        if self.restart is None:
            return
        with self._lock:
            if self._stopping:
                return
            now = time.monotonic()
            for name, process in self._supervised().items():
                due = self._restart_due.get(name)
                if due is not None:
                    if now >= due:
                        del self._restart_due[name]
                        self._restart(name)
                elif process.poll() is not None and name not in self._given_up:
                    if process.returncode == PORT_IN_USE_EXIT:  # restarting it would only fail the same way
                        self._given_up.add(name)
                        raise PortTaken(f"{name}: exited because another process holds its port; not restarting "
                                        f"it (log: {self.log_path(name)}):\n{self.log_tail(name, 3)}")
                    ran_s = now - self._started_at[name]
                    backoff = self._backoff.setdefault(name, Backoff(self.restart))
                    delay = backoff.delay_after(ran_s)
                    self._restart_due[name] = now + delay
                    self.progress(f"{name}: exited ({_exit_reason(process.returncode)}) after {ran_s:.1f}s; "
                                  f"restart #{backoff.restarts} in {delay:.1f}s (log: {self.log_path(name)})")
            self._announce_serving_again()

    def supervise_in_background(self, every_s: float = 0.2) -> None:
        """``supervise`` on a thread of its own until ``stop``."""
        def loop() -> None:
            while not self._stopping:
                try:
                    self.supervise()
                except PortTaken as taken:
                    self.progress(str(taken))
                time.sleep(every_s)

        self._supervisor = threading.Thread(target=loop, name="mesh-supervisor", daemon=True)
        self._supervisor.start()

    def _supervised(self) -> dict[str, subprocess.Popen]:
        return {**({"redis": self._redis} if self._redis is not None else {}), **self.processes}

    def _restart(self, name: str) -> None:
        if name == "redis":
            self._spawn_redis(restarted=True)
            self.progress(f"redis: restarted (pid {self._redis.pid}), empty: the caches start cold")
            return
        service = self.instances[name]
        self._spawn(service, self.redis_url_for(service.name), restarted=True, instance=name)
        self._awaiting_serving[name] = 0.0

    def _announce_serving_again(self) -> None:
        now = time.monotonic()
        for name, checked in list(self._awaiting_serving.items()):
            if now - checked < 0.5:
                continue
            self._awaiting_serving[name] = now
            if self.health(name, 0.3, self.probe_credentials()) == "SERVING":
                del self._awaiting_serving[name]
                self.progress(f"{name}: SERVING again, {now - self._started_at[name]:.1f}s after its restart")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every process (the gateway first, Redis last); SIGKILL to any still running after ``grace_s``."""
        with self._lock:
            self._stopping = True
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=5.0)
        services = [self.processes[name] for name in reversed(list(self.processes))]
        for group in (services, [self._redis] if self._redis else []):
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for process in group:
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def state(self) -> dict:
        """What `nlpmesh` records of this mesh in its state file (cli/run_state.py)."""
        processes = self._supervised()
        return {"gateway": self.gateway_address if "gateway" in self.ports else None,
                "edge": self.edge_url() if EDGE in self.ports else None,
                "pids": {name: p.pid for name, p in processes.items()},
                "started": {name: start_time(p.pid) or "" for name, p in processes.items()},
                "ports": self.ports, "metrics_ports": self.metrics_ports,
                "replicas": {s.name: self.replicas(s.name) for s in self.services},
                "models": self.model_instances,
                "tls_dir": str(self.tls_dir) if self.tls_dir else None}

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"redis-server did not open port {port}")

