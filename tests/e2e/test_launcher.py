"""`nlpmesh up` as a user runs it (a subprocess, TLS and API keys on, its own NLPMESH_HOME): it cleans up after
itself however it is stopped, restarts what crashes, and the gateway's health says what it can serve."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.downstream_health import CACHE_PATH
from tests.launched import CHILDREN_GONE_S, ONE_MODEL, READY_S, Launched, kill, own_home, running
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]


@pytest.fixture
def home(tmp_path) -> Path:
    return own_home(tmp_path)


def test_the_launcher_replaces_a_stale_state_restarts_a_crash_tracks_health_and_cleans_up_on_sigterm(home):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (home / "run").mkdir()
    (home / "run" / "mesh.json").write_text(json.dumps({"launcher": {"pid": gone.pid, "started": "1"},
                                                       "gateway": "127.0.0.1:1", "pids": {}}))
    mesh = Launched(home)
    try:
        mesh.up()
        assert "is stale" in mesh.said() and "replacing it" in mesh.said()
        assert mesh.health() == "SERVING" and mesh.health(CACHE_PATH) == "SERVING"

        # A stopped tokenizer: generations cannot be made, cache hits still can.
        tokenizer = mesh.state()["pids"]["tokenizer"]
        os.kill(tokenizer, signal.SIGSTOP)
        try:
            wait_until(lambda: mesh.health() == "NOT_SERVING", 30, 0.5, what="the gateway NOT_SERVING")
            assert mesh.health(CACHE_PATH) == "SERVING"
        finally:
            os.kill(tokenizer, signal.SIGCONT)
        wait_until(lambda: mesh.health() == "SERVING", 30, 0.5, what="the gateway SERVING again")

        # A crashed tokenizer: restarted by the launcher, and the mesh answers again.
        os.kill(tokenizer, signal.SIGKILL)
        wait_until(lambda: "tokenizer: exited (killed by SIGKILL)" in mesh.said(), 10, 0.2, what="the crash seen")
        wait_until(lambda: "tokenizer: SERVING again" in mesh.said(), 120, 0.5, what="the tokenizer restarted")
        assert mesh.state()["pids"]["tokenizer"] != tokenizer
        wait_until(lambda: mesh.health() == "SERVING", 30, 0.5, what="the gateway SERVING after the restart")
        answer = mesh.cli("ask", "Say hello.", "--max-new-tokens", "4", "--cache", "bypass")
        assert answer.returncode == 0, answer.stdout + answer.stderr

        # SIGTERM, as systemd, `timeout` or CI send it: the same cleanup as Ctrl-C.
        children = list(mesh.state()["pids"].values())
        mesh.process.send_signal(signal.SIGTERM)
        assert mesh.process.wait(timeout=60) == 0, mesh.said()
        assert "stopping (SIGTERM)" in mesh.said()
        assert not mesh.state_file.exists()
        assert running(children) == []
    finally:
        mesh.kill_everything()


def test_a_sigkilled_launcher_takes_its_children_with_it_and_down_twice_is_fine(home):
    mesh = Launched(home)
    try:
        mesh.up()
        children = list(mesh.state()["pids"].values())
        assert len(running(children)) == 6  # five services and the private Redis
        mesh.process.kill()
        mesh.process.wait()
        started = time.monotonic()
        wait_until(lambda: running(children) == [], CHILDREN_GONE_S, 0.2,
                   what=lambda: f"the children gone; still running: {running(children)}")
        print(f"children gone {time.monotonic() - started:.1f}s after the launcher's SIGKILL")

        first = mesh.cli("down")
        assert first.returncode == 0 and "stale" in first.stdout, first.stdout
        assert not mesh.state_file.exists()
        second = mesh.cli("down")
        assert second.returncode == 0 and "no mesh is up" in second.stdout, second.stdout
    finally:
        mesh.kill_everything()


def test_a_detached_mesh_outlives_the_cli_and_down_stops_it_all(home):
    mesh = Launched(home)
    try:
        started = mesh.cli("up", "--detach", "--free-ports", *ONE_MODEL, timeout_s=READY_S)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "mesh ready" in started.stdout and "running in the background" in started.stdout
        state = mesh.state()
        assert mesh.health() == "SERVING"
        processes = [state["launcher"]["pid"], *state["pids"].values()]
        assert len(running(processes)) == 7  # the launcher, five services, Redis

        stopped = mesh.cli("down")
        assert stopped.returncode == 0, stopped.stdout
        assert running(processes) == []
        assert not mesh.state_file.exists()
    finally:
        if mesh.state_file.exists():
            kill(mesh.state()["launcher"]["pid"], signal.SIGKILL)
        mesh.kill_everything()
