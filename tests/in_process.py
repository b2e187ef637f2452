"""The in-process rule: a test that spawns a process, or connects to a socket its own
process did not open, fails, naming what it tried.

tests/unit keeps to it, and so does every servicer test not marked ``redis`` or ``model``;
that is what lets ``make test-fast`` run without a redis-server, the real model or any
other process. Whatever needs them lives in tests/integration (or is marked, in
tests/servicer). Connecting to a port this process bound itself (an in-process server)
stays in-process and is allowed. gRPC's own sockets are C-core's and are not seen here;
the servers they reach in these tests are in-process ones.
"""
from __future__ import annotations

import os
import socket
import subprocess
from contextlib import contextmanager

import pytest

_bound_ports: set[int] = set()  # ports this process has bound: connecting to them stays in-process


def _refuse(what: str, where: str):
    pytest.fail(f"{where} runs in-process, but this test {what}")


@contextmanager
def in_process_only(where: str):
    real_bind, real_connect, real_connect_ex = socket.socket.bind, socket.socket.connect, socket.socket.connect_ex

    def bind(sock, address):
        real_bind(sock, address)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            _bound_ports.add(sock.getsockname()[1])

    def checked(address, family):
        if family == socket.AF_UNIX:
            _refuse(f"connected to the unix socket {address!r}", where)
        if family in (socket.AF_INET, socket.AF_INET6) and address[1] not in _bound_ports:
            _refuse(f"connected to {address[0]}:{address[1]}, which this process did not open", where)

    def connect(sock, address):
        checked(address, sock.family)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        checked(address, sock.family)
        return real_connect_ex(sock, address)

    def popen(self, args, *rest, **kwargs):
        _refuse(f"started a process: {args!r}", where)

    def spawn(*args, **kwargs):
        _refuse("forked or spawned a process", where)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "bind", bind)
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket.socket, "connect_ex", connect_ex)
        patch.setattr(subprocess.Popen, "__init__", popen)
        patch.setattr(os, "fork", spawn)
        patch.setattr(os, "posix_spawn", spawn)
        patch.setattr(os, "system", lambda command: _refuse(f"ran {command!r}", where))
        yield
