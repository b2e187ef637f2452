"""Fixtures shared by every test directory."""
from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis import asyncio as aioredis

from cli.launcher import free_port
from cli.redis_acl import RedisUsers, write
from meshkit.tracing.provider import ChosenIds
from tests.polling import until, wait_until

REDIS_SERVER = "redis-server"
# A test using one of these fixtures, or in a module that imports a starter, is marked ``redis``.
REDIS_FIXTURES = frozenset({"redis_server", "disposable_redis_server", "acl_redis_server", "acl_redis"})
REDIS_STARTERS = ("running_redis_server", "running_redis_cluster")


def pytest_collection_modifyitems(items):
    for item in items:
        module = getattr(item, "module", None)
        if (REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ()))
                or any(hasattr(module, starter) for starter in REDIS_STARTERS)):
            item.add_marker(pytest.mark.redis)


@dataclass
class RedisProcess:
    url: str
    process: subprocess.Popen
    command: tuple[str, ...] = ()
    port: int = 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """The same server, empty, on the same port again: a Redis that came back."""
        self.stop()
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until_listening(self.port, self.process)


@contextmanager
def running_redis_server(*extra_args: str):
    """A private, memory-only redis-server on a free port, killed on exit.

    ``extra_args`` go to redis-server (``--aclfile``, ``--tls-port``...); ``url``
    then names no user, so with the default user off each test builds its own.
    """
    binary = shutil.which(REDIS_SERVER) or "/usr/bin/redis-server"
    if not shutil.which(binary):
        pytest.fail("redis-server is not installed (apt-get install redis-server); the cache tests need it")
    port = free_port()
    command = (binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--daemonize", "no", "--enable-debug-command", "local", *extra_args)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisProcess(url=f"redis://127.0.0.1:{port}/0", process=process, command=command, port=port)
    try:
        _wait_until_listening(port, process)
        yield server
    finally:
        server.stop()


def _wait_until_listening(port: int, process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    def answers() -> bool:
        if process.poll() is not None:
            pytest.fail(f"redis-server exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: up, default user off
        except OSError:
            return False

    wait_until(answers, timeout_s=timeout_s, what=f"redis-server to answer on port {port}")


@pytest.fixture(scope="session")
def redis_server():
    """The URL of a private redis-server shared by the session; use a unique key prefix per test."""
    with running_redis_server() as server:
        yield server.url


@pytest.fixture
def disposable_redis_server():
    """A private redis-server for one test, which the test may ``stop()``."""
    with running_redis_server() as server:
        yield server


@dataclass
class AclRedis:
    """A private redis-server run with deploy/redis/users.acl, and each user's password."""

    server: RedisProcess
    users: RedisUsers

    def url(self, user: str) -> str:
        return self.users.url(user, "127.0.0.1", self.server.port)

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user), socket_timeout=5)

    def refused(self) -> list[tuple[str, str]]:
        """(user, command or key) for each refusal in the server's ACL LOG since the test began."""
        with self.client("admin") as admin:
            return [(entry["username"], entry["object"]) for entry in admin.acl_log()]


@pytest.fixture(scope="module")
def acl_redis_server(tmp_path_factory):
    users = RedisUsers.make()
    acl_file, _ = write(tmp_path_factory.mktemp("redis-acl"), users, "127.0.0.1", 0)
    with running_redis_server("--aclfile", str(acl_file)) as server:
        yield AclRedis(server, users)


@pytest.fixture
def acl_redis(acl_redis_server):
    """The module's redis-server with the shipped ACL users, its ACL LOG emptied for this test."""
    with acl_redis_server.client("admin") as admin:
        admin.acl_log_reset()
    return acl_redis_server


@pytest.fixture
def finished_spans():
    """The spans this process finishes during the test: ``finished_spans.get_finished_spans()``.

    The tracer provider is process-wide and set once; each test adds its own
    in-memory exporter to it and shuts that exporter down after.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(id_generator=ChosenIds())  # as configure_tracing's
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def fill_until_refused(url: str) -> None:
    """Writes until Redis refuses, then keeps it over its bound (freed client buffers would let writes in)."""
    with redis.Redis.from_url(url) as client:
        for index in itertools.count():
            try:
                client.set(f"filler:{index}", b"x" * 16384)
            except redis.OutOfMemoryError:
                client.config_set("maxmemory", "1mb")
                return


async def until_redis_blocked(url: str) -> None:
    """Returns once a DEBUG SLEEP sent before holds the server: a PING of its own goes unanswered."""
    probe = aioredis.Redis.from_url(url, socket_timeout=0.05)

    async def blocked() -> bool:
        try:
            await probe.ping()
        except (redis.TimeoutError, TimeoutError):
            return True
        return False

    try:
        await until(blocked, timeout_s=5.0, every_s=0.01, what=f"a DEBUG SLEEP to hold the redis-server at {url}")
    finally:
        await probe.aclose()


@pytest.fixture
def engines():
    """Makes tiny engines (with the given prefix cache) and closes them after the test."""
    from tests.tiny_llama import tiny_engine  # torch and transformers only for the tests that use it

    made = []

    def make(prefix_cache=None):
        made.append(tiny_engine(prefix_cache=prefix_cache))
        return made[-1]

    yield make
    for engine in made:
        engine.close()
