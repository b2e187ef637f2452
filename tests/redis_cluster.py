"""A real 3-master Redis Cluster for tests: three redis-servers on free loopback ports, joined by redis-cli.

    @pytest.fixture(scope="module")
    def cluster():
        with running_redis_cluster() as running:
            yield running

    def test_x(cluster):
        cluster.url                  # redis+cluster://127.0.0.1:P1/0 (meshkit/redis_connect.py)
        cluster.node_of("some:key")  # which master's port holds that key now

Each node runs memory-only in its own temporary directory (its nodes.conf);
the cluster is created with ``redis-cli --cluster create ... --cluster-replicas 0``
and the fixture waits, with a bounded poll, until every node says
``cluster_state:ok`` and knows all three masters. Everything is killed on exit.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import pytest
import redis

from tests.conftest import REDIS_SERVER, RedisProcess, _wait_until_listening, free_port
from tests.polling import wait_until

MASTERS = 3
BUS_PORT_OFFSET = 10000  # a cluster node also listens on its port + 10000 (the cluster bus)


@dataclass
class RedisCluster:
    nodes: list[RedisProcess]
    auth: tuple[str, str] | None = None  # (user, password) that may run admin commands, for an ACL cluster
    tls_ports: list[int] = field(default_factory=list)  # each node's TLS port, for a TLS cluster

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """The URL the mesh takes for a cluster: one seed node, the others are discovered."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    def node_client(self, port: int) -> redis.Redis:
        user, password = self.auth or (None, None)
        return redis.Redis(host="127.0.0.1", port=port, username=user, password=password, socket_timeout=5)

    def client(self) -> redis.cluster.RedisCluster:
        """An admin cluster client (redis-py's), for looking at what the code under test wrote."""
        user, password = self.auth or (None, None)
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.ports[0], username=user, password=password,
                                          socket_timeout=5)

    def node_of(self, key: str | bytes) -> int:
        """The port of the master that holds ``key``'s slot."""
        with self.node_client(self.ports[0]) as any_node:
            slot = any_node.cluster("KEYSLOT", key)
            for start, end, master, *_ in any_node.cluster("SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"no master serves slot {slot}")

    def keys_per_node(self, pattern: str) -> dict[int, list[bytes]]:
        """Every key matching ``pattern``, by the port of the master holding it."""
        found = {}
        for port in self.ports:
            with self.node_client(port) as node:
                found[port] = list(node.scan_iter(match=pattern, count=1000))
        return found


def _cluster_ok(cluster: RedisCluster) -> bool:
    for port in cluster.ports:
        try:
            with cluster.node_client(port) as node:
                info = node.cluster("INFO")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != MASTERS:
                    return False
        except redis.RedisError:
            return False
    return True


def _node_port(taken: set[int]) -> int:
    """A free port whose cluster-bus port (+10000) is a valid port and free too."""
    for _ in range(200):
        port = free_port()
        if port + BUS_PORT_OFFSET > 65535 or port in taken or port + BUS_PORT_OFFSET in taken:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + BUS_PORT_OFFSET))
        except OSError:
            continue
        return port
    pytest.fail("no free port pair for a cluster node")


@contextmanager
def _cluster_node(workdir: str, port: int, extra_args: tuple[str, ...]) -> Iterator[RedisProcess]:
    binary = shutil.which(REDIS_SERVER) or "/usr/bin/redis-server"
    command = (binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--daemonize", "no", "--dir", workdir, "--cluster-enabled", "yes",
               "--cluster-config-file", f"{workdir}/nodes.conf", "--cluster-node-timeout", "5000", *extra_args)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = RedisProcess(url=f"redis://127.0.0.1:{port}/0", process=process, command=command, port=port)
    try:
        _wait_until_listening(port, process)
        yield node
    finally:
        node.stop()


@contextmanager
def running_redis_cluster(*extra_args: str, auth: tuple[str, str] | None = None,
                          tls: bool = False) -> Iterator[RedisCluster]:
    """Three cluster-enabled redis-servers joined into one cluster; ``extra_args`` go to each server.

    ``tls``: each node also gets a ``--tls-port`` of its own (``tls_ports``) and the
    cluster bus runs TLS (``--tls-cluster yes``); ``extra_args`` then name the
    certificate files. The plaintext ports stay, for the fixture's own checks.
    """
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        pytest.fail("redis-cli is not installed (apt-get install redis-tools); the cluster tests need it")
    with ExitStack() as stack:
        nodes: list[RedisProcess] = []
        tls_ports: list[int] = []
        for _ in range(MASTERS):
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="nlpmesh-cluster-"))
            taken = {port + offset for port in (node.port for node in nodes) for offset in (0, BUS_PORT_OFFSET)}
            taken |= set(tls_ports)
            port = _node_port(taken)
            node_args = extra_args
            if tls:
                tls_ports.append(_node_port(taken | {port, port + BUS_PORT_OFFSET}))
                node_args = ("--tls-port", str(tls_ports[-1]), "--tls-cluster", "yes", *extra_args)
            nodes.append(stack.enter_context(_cluster_node(workdir, port, node_args)))
        cluster = RedisCluster(nodes, auth, tls_ports)
        login = ["--user", auth[0], "--pass", auth[1]] if auth else []
        created = subprocess.run(
            [redis_cli, *login, "--cluster", "create", *(f"127.0.0.1:{port}" for port in cluster.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60)
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {created.stdout[-1000:]} {created.stderr[-1000:]}")
        wait_until(lambda: _cluster_ok(cluster), timeout_s=30, every_s=0.2,
                   what=f"cluster_state:ok with {MASTERS} masters on ports {cluster.ports}")
        yield cluster
