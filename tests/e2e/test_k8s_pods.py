"""deploy/k8s's container specs run as local processes: no cluster, but the pod's own
command, variables (Kubernetes' $(VAR) expansion included), Secret and ConfigMap volumes
laid out as the kubelet lays them out, and its exec probes, run as the kubelet would run them.

What is rewritten, and only that: ports (free local ones instead of the pod's), the
listening host (loopback), Redis's host name (``redis`` resolves nowhere here), the
``python``/``nlpmesh`` executables (this interpreter), and the OpenTelemetry variables
(no collector runs). The Secrets are made by the real ``nlpmesh certs init`` and
``nlpmesh redis-acl`` code.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from cli import redis_acl
from cli.ask import ask, build_question
from cli.certs import init_certs
from cli.connect import GatewayAccess
from cli.launcher import check_health, distinct_free_ports
from cli.main import DEMO_QUESTION
from gateway.api_keys import create_key
from gateway.tenant import Tenant
from meshkit.settings import TLS_DIR_ENV, default_home
from meshkit.tls import CA_FILE
from modelfiles.architectures import engine_supports
from modelfiles.convert import load_model_files
from tests.catalogue_services import ADDRS_ENV, catalogue_ids, inference_service
from tests.conftest import free_port
from tests.k8s_render import container, find, kubelet_layout, render, workload
from tests.polling import wait_until

pytestmark = pytest.mark.e2e

_VAR = re.compile(r"\$\((\w+)\)")


@dataclass
class LocalPod:
    """One container of the base, as a process, with what its probes need."""

    name: str
    process: subprocess.Popen
    env: dict[str, str]
    ports: dict[int, int]  # the pod's port -> the local one
    spec: dict
    grace_s: int
    started_at: float = 0.0  # time.monotonic() at the process's start
    paths: dict[str, str] = dataclasses.field(default_factory=dict)  # a mount path -> its local folder

    def probe(self, which: str) -> subprocess.CompletedProcess:
        """The container's exec probe, as the kubelet runs it: in the container's environment,
        within the probe's timeoutSeconds."""
        probe = self.spec[which]
        command = [self._local(part) for part in probe["exec"]["command"]]
        if command[0] == "nlpmesh":
            command = [sys.executable, "-m", "cli.main", *command[1:]]
        return subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=probe["timeoutSeconds"] + 5)

    def wait_started(self) -> float:
        """Seconds from the process's start until the startup probe passed, failing after its
        window (failureThreshold x periodSeconds), as the kubelet would restart the container then."""
        probe = self.spec["startupProbe"]
        wait_until(lambda: self.process.poll() is not None or self.probe("startupProbe").returncode == 0,
                   timeout_s=probe["failureThreshold"] * probe["periodSeconds"], every_s=probe["periodSeconds"],
                   what=f"{self.name}'s startup probe")
        assert self.process.poll() is None, f"{self.name} exited with {self.process.returncode}"
        return time.monotonic() - self.started_at

    def _local(self, text: str) -> str:
        text = local_paths(text, self.paths)
        for pod_port, port in self.ports.items():
            text = text.replace(f"127.0.0.1:{pod_port}", f"127.0.0.1:{port}")
            text = re.sub(r"\bredis-cli\b(?! -p)", f"redis-cli -p {port}", text) if pod_port == 6379 else text
        return text

    def stop(self) -> float:
        """SIGTERM, as the kubelet sends; seconds until the process exited, or inf when it
        outlived terminationGracePeriodSeconds (then it is killed, as the kubelet would)."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return float("inf")
        return time.monotonic() - started


def start_pod(objects: list[dict], name: str, root: Path, secrets: dict[str, dict[str, str]],
              hosts: dict[str, int], ports: dict[int, int] | None = None) -> LocalPod:
    """Runs ``name``'s container: its volumes under ``root``, its Secrets from ``secrets``;
    ``hosts``: a service name -> the local port its address (a Redis URL's host, a dns:///
    target) is rewritten to; ``ports``: the pod's port -> a local one (default: free ones)."""
    spec = container(objects, name)
    pod = workload(objects, name)["spec"]["template"]["spec"]
    paths = mounted_volumes(objects, name, root, secrets)
    ports = ports or {p["containerPort"]: free_port() for p in spec["ports"]}
    env: dict[str, str] = {}
    for entry in spec.get("env", []):
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
        else:  # Kubernetes: $(VAR) of a variable defined above, else left as written
            env[entry["name"]] = _VAR.sub(lambda m: env.get(m[1], m[0]), entry["value"])
    for key, value in list(env.items()):
        if key.startswith("OTEL_"):
            del env[key]
            continue
        value = local_paths(value, paths)  # also inside a URL (rediss://...?ssl_ca_certs=/etc/...)
        if key.endswith("_HOST"):
            value = "127.0.0.1"
        elif key.endswith("_PORT") and value.isdigit() and int(value) in ports:
            value = str(ports[int(value)])
        for host, port in hosts.items():  # also inside the gateway's JSON map of per-model addresses
            value = re.sub(rf"@{host}:\d+/", f"@127.0.0.1:{port}/", value)
            value = re.sub(rf"dns:///{host}:\d+\b", f"dns:///localhost:{port}", value)
        env[key] = value
    args = [sys.executable if part == "python" else part for part in spec["args"]]
    full_env = {**os.environ, **env}  # NLPMESH_HOME as set up: the converted model, as in the image
    full_env.pop("NLPMESH_TRACE_DIR", None)
    with open(root / f"{name}.log", "w") as log:
        process = subprocess.Popen(args, env=full_env, cwd=Path(__file__).resolve().parents[2],
                                   stdout=log, stderr=subprocess.STDOUT)
    return LocalPod(name, process, full_env, ports, spec, pod["terminationGracePeriodSeconds"], time.monotonic(),
                    paths)


def mounted_volumes(objects: list[dict], name: str, root: Path, secrets: dict[str, dict[str, str]]
                    ) -> dict[str, str]:
    """``name``'s container's Secret and ConfigMap volumes laid out under ``root`` as the kubelet lays them
    out, with their modes: a mount path -> its local folder."""
    spec = container(objects, name)
    volumes = {v["name"]: v for v in workload(objects, name)["spec"]["template"]["spec"].get("volumes", [])}
    paths = {}
    for mount in spec.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        source = volume.get("secret") or volume["configMap"]
        data = secrets[source["secretName"]] if "secret" in volume else \
            find(objects, "ConfigMap", source["name"])["data"]
        local = kubelet_layout(root / "volumes" / name / mount["name"], data, source.get("items"))
        for path in local.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(source.get("defaultMode", 0o644))
        paths[mount["mountPath"]] = str(local)
    return paths


def local_paths(text: str, paths: dict[str, str]) -> str:
    """``text`` with each mount path (alone, or as a folder anywhere in it) made its local folder."""
    for mount_path, local in paths.items():
        text = local if text == mount_path else text.replace(mount_path + "/", local + "/")
    return text


@pytest.fixture(scope="module")
def objects():
    return render()


@dataclass
class MeshSecrets:
    """The four Secrets as README "Kubernetes" makes them, with the real nlpmesh code."""

    secrets: dict[str, dict[str, str]]
    users: redis_acl.RedisUsers
    api_key: str


def make_secrets(folder: Path, certs: dict[str, str]) -> MeshSecrets:
    users = redis_acl.RedisUsers.make()
    acl, env_file = redis_acl.write(folder / "redis-acl", users, "redis", 6379)
    # nlpmesh-redis-users: the three services' passwords, not the admin's.
    passwords = {k: v for k, v in (line.split("=", 1) for line in env_file.read_text().splitlines()
                                   if "=" in line and not line.startswith("#"))
                 if k in {redis_acl.password_env(u) for u in redis_acl.SERVICE_USERS}}
    _, api_key = create_key(folder / "keys" / "keys.toml", Tenant("acme"))
    return MeshSecrets({"nlpmesh-certs": certs, "nlpmesh-redis-acl": {acl.name: acl.read_text()},
                        "nlpmesh-redis-users": passwords,
                        "nlpmesh-api-keys": {"keys.toml": (folder / "keys" / "keys.toml").read_text()}},
                       users, api_key)


@dataclass
class LocalRedis:
    process: subprocess.Popen
    port: int  # its TLS port: the StatefulSet serves no plaintext
    paths: dict[str, str]  # its mount paths -> their local folders

    @property
    def ca_file(self) -> str:
        return local_paths("/etc/nlpmesh/certs/ca.crt", self.paths)


@contextmanager
def redis_statefulset(objects: list[dict], root: Path, secrets: dict[str, dict[str, str]]):
    """redis-server with the StatefulSet's own arguments (TLS only), its ACL file, certificate and key from the
    Secrets' volumes; only its TLS port is a free local one, on loopback."""
    args = container(objects, "redis")["args"]
    paths = mounted_volumes(objects, "redis", root, secrets)
    port = free_port()
    local_args = [local_paths(a, paths) for a in args[1:]]
    local_args[local_args.index("--tls-port") + 1] = str(port)
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    process = subprocess.Popen([binary, *local_args, "--bind", "127.0.0.1", "--daemonize", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = LocalRedis(process, port, paths)
    try:
        def answers() -> bool:
            assert process.poll() is None, f"redis-server exited with {process.returncode}"
            try:
                redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=server.ca_file,
                            socket_timeout=1).ping()
            except redis.AuthenticationError:
                return True  # up: its default user is off
            except redis.RedisError:
                return False
            return True
        wait_until(answers, timeout_s=15, what="the Redis StatefulSet's redis-server to answer over TLS")
        yield server
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
def certs_secret(tmp_path) -> dict[str, str]:
    """nlpmesh-certs as README "Kubernetes" makes it: every file of `nlpmesh certs init` but ca.key."""
    folder = tmp_path / "certs"
    init_certs(folder)
    return {path.name: path.read_text() for path in folder.iterdir() if path.name != "ca.key"}


def test_the_template_pod_starts_and_its_probes_pass_over_mtls_only(objects, tmp_path, certs_secret):
    pod = start_pod(objects, "template", tmp_path, {"nlpmesh-certs": certs_secret}, {})
    try:
        print(f"template: startup probe passed {pod.wait_started():.1f} s after its start")
        for which in ("readinessProbe", "livenessProbe"):
            done = pod.probe(which)
            assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), (which, done.stderr)
        # What the kubelet's own grpc: probe would do, plaintext gRPC: the mTLS server refuses it.
        address = f"127.0.0.1:{pod.ports[50052]}"
        assert check_health(address, 2.0, None) == "UNREACHABLE"
        # The probe without its certificate folder fails too: the exec probe needs the mount.
        env = {k: v for k, v in pod.env.items() if k != "NLPMESH_TLS_DIR"}
        done = subprocess.run([sys.executable, "-m", "cli.main", "health", "--addr", address, "--plaintext"],
                              env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and done.stdout.strip() == "UNREACHABLE"
    finally:
        seconds = pod.stop()
    print(f"template: exited {seconds:.1f} s after SIGTERM (grace {pod.grace_s} s)")
    assert seconds < pod.grace_s


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                    reason="needs redis-server and redis-cli")
def test_the_cache_pod_reaches_the_redis_statefulset_as_its_own_user(objects, tmp_path, certs_secret):
    made = make_secrets(tmp_path / "made", certs_secret)
    with redis_statefulset(objects, tmp_path, made.secrets) as server, _admin(server, made.users) as admin:
        config = admin.config_get("maxmemory*")
        assert config["maxmemory-policy"] == "allkeys-lru" and int(config["maxmemory"]) == 256 * 2**20
        redis_pod = LocalPod("redis", server.process, dict(os.environ), {6379: server.port},
                             container(objects, "redis"), 10, paths=server.paths)
        for which in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert redis_pod.probe(which).returncode == 0, which
        # Plaintext gets nowhere: the StatefulSet serves TLS only.
        with pytest.raises(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2).ping()
        pod = start_pod(objects, "cache", tmp_path, made.secrets, {"redis": server.port})
        try:
            pod.wait_started()
            assert pod.probe("readinessProbe").returncode == 0
            # The cache service checked Redis at start as the `cache` user (its connection
            # stays in its pool), and Redis refused nothing.
            wait_until(lambda: "cache" in {c["user"] for c in admin.client_list()}, timeout_s=10,
                       what="a connection of the cache user")
            assert admin.acl_log() == []
            password = made.users.passwords["cache"]
            assert password not in (tmp_path / "cache.log").read_text()
        finally:
            assert pod.stop() < pod.grace_s


def _admin(server: LocalRedis, users: redis_acl.RedisUsers) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, username="admin", password=users.passwords["admin"],
                       socket_timeout=5, ssl=True, ssl_ca_certs=server.ca_file)


@pytest.mark.model
@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                    reason="needs redis-server and redis-cli")
def test_the_whole_base_answers_through_the_gateway_and_the_second_answer_is_a_cache_hit(
        objects, tmp_path, certs_secret):
    """Every pod of the base at once: the gateway reaches the others through dns:/// targets
    (each model's inference Deployment through its own) with each pod's own certificate, Redis
    as each service's user, the budgets and templates from their ConfigMaps and the API key
    from its Secret; each model the engine runs answers; then each drains on SIGTERM within its
    grace period. A model the built-in engine does not run yet has no pod here: its address
    points at a port nothing listens on, and the gateway serves the other models without it."""
    made = make_secrets(tmp_path / "made", certs_secret)
    home = default_home()
    runs = [m for m in catalogue_ids() if engine_supports(load_model_files(home, m).architecture)]
    assert catalogue_ids()[0] in runs, "the default model must run"
    inference = tuple(inference_service(m) for m in runs)
    left_out = [inference_service(m) for m in catalogue_ids() if m not in runs]
    print(f"inference pods: {', '.join(inference)}; not run (the engine does not run them yet): {left_out or 'none'}")
    with redis_statefulset(objects, tmp_path, made.secrets) as server, _admin(server, made.users) as admin:
        order = ("template", "tokenizer", "cache", *inference, "gateway")
        # Every port at once, all different (one by one, a port picked and released could come again).
        picked = iter(distinct_free_ports(len(order) + len(left_out)
                                          + sum(len(container(objects, n)["ports"]) for n in order)))
        ports = {name: next(picked) for name in (*order, *left_out)}
        hosts = {"redis": server.port, **ports}
        pods: dict[str, LocalPod] = {}
        try:
            for name in order:
                pod_ports = {p["containerPort"]: next(picked) for p in container(objects, name)["ports"]}
                grpc_port = next(p["containerPort"] for p in container(objects, name)["ports"] if p["name"] == "grpc")
                pod_ports[grpc_port] = ports[name]
                pods[name] = start_pod(objects, name, tmp_path, made.secrets, hosts, pod_ports)
            for name, pod in pods.items():
                print(f"{name}: startup probe passed {pod.wait_started():.1f} s after its start")
                for which in ("readinessProbe", "livenessProbe"):
                    assert pod.probe(which).returncode == 0, (name, which)
            fixed = ("template", "tokenizer", "cache")
            targets = {pods["gateway"].env[f"NLPMESH_GATEWAY_{n.upper()}_ADDR"] for n in fixed}
            assert targets == {f"dns:///localhost:{ports[n]}" for n in fixed}
            assert json.loads(pods["gateway"].env[ADDRS_ENV]) == \
                {m: f"dns:///localhost:{ports[inference_service(m)]}" for m in catalogue_ids()}
            access = GatewayAccess(f"localhost:{ports['gateway']}",
                                   ca_file=Path(pods["gateway"].env[TLS_DIR_ENV]) / CA_FILE, api_key=made.api_key)
            for model in runs[1:]:  # each other model the engine runs, by name, from its own Deployment
                other = build_question(DEMO_QUESTION, "finance_question", {"question": DEMO_QUESTION}, 8, 0.0, None,
                                       "bypass", model)
                answer = ask(access, other, out=io.StringIO())
                assert answer.text and answer.model == model
            request = build_question(DEMO_QUESTION, "finance_question", {"question": DEMO_QUESTION}, 8, 0.0, None,
                                     "refresh")
            first = ask(access, request, out=io.StringIO())
            assert first.text and not first.cache_hit
            assert first.model == catalogue_ids()[0]  # no model named: the default
            request = dataclasses.replace(request, cache="use")
            second = wait_until(lambda: (lambda r: r if r.cache_hit else None)(
                ask(access, request, out=io.StringIO())), timeout_s=10, every_s=0.5,
                what="the second answer from the prompt cache")
            assert second.text == first.text
            assert admin.acl_log() == []  # every service stayed within its Redis user's grants
            assert {c["user"] for c in admin.client_list()} >= {"gateway", "cache", "inference"}
        finally:
            stopped = {name: pods[name].stop() for name in reversed(list(pods))}
            for name, seconds in stopped.items():
                print(f"{name}: exited {seconds:.1f} s after SIGTERM (grace {pods[name].grace_s} s)")
        assert all(seconds < pods[name].grace_s for name, seconds in stopped.items()), stopped
