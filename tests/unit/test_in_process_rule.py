"""The rule tests/unit runs under (tests/in_process.py): what it refuses, and what it lets through."""
import socket
import subprocess

import pytest
import redis


def test_starting_a_process_fails_the_test():
    with pytest.raises(pytest.fail.Exception, match="started a process"):
        subprocess.run(["true"], check=True)


def test_connecting_to_a_redis_this_process_did_not_open_fails_the_test():
    with pytest.raises(pytest.fail.Exception, match=r"127\.0\.0\.1:6379, which this process did not open"):
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()


def test_a_server_this_process_opened_may_be_reached():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=1) as client:
            assert client.getpeername() == server.getsockname()
