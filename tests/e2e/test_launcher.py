"""`nlpmesh up` as a user runs it (a subprocess, TLS and API keys on, its own NLPMESH_HOME): it cleans up after
itself however it is stopped, restarts what crashes, the gateway's health says what it can serve, and one mesh
owns its home and its ports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.launcher import check_health
from cli.topology import REPO_ROOT
from gateway.downstream_health import CACHE_PATH
from meshkit.server import PORT_IN_USE_EXIT
from meshkit.tls import probe_credentials
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
        assert len(running(children)) == 8  # seven services (the OpenAI edge and embedding among them), Redis
        mesh.process.kill()
        mesh.process.wait()
        started = time.monotonic()
        wait_until(lambda: running(children) == [], CHILDREN_GONE_S, 0.2,
                   what=lambda: f"the children gone; still running: {running(children)}")
        print(f"children gone {time.monotonic() - started:.1f}s after the launcher's SIGKILL")

        first = mesh.cli("down")
        assert first.returncode == 0 and "stale" in first.stdout, first.stdout
        assert not mesh.state_file.exists() and not (home / "run" / "launcher.pid").exists()
        second = mesh.cli("down")
        assert second.returncode == 0 and "no mesh is up" in second.stdout, second.stdout

        # And a new mesh comes up in the same home.
        again = Launched(home, "again")
        try:
            again.up()
            assert again.health() == "SERVING"
        finally:
            again.kill_everything()
    finally:
        mesh.kill_everything()


def test_one_mesh_per_home_and_per_port_and_down_finds_a_launcher_whose_state_file_was_removed(home):
    mesh = Launched(home)
    second = Launched(home, "second")
    processes = []
    try:
        started = mesh.cli("up", "--detach", *ONE_MODEL, timeout_s=READY_S)  # the fixed ports, 50051 and up
        assert started.returncode == 0, started.stdout + started.stderr
        state = mesh.state()
        processes = [state["launcher"]["pid"], *state["pids"].values()]
        credentials = probe_credentials(Path(state["tls_dir"]))

        refused = second.cli("up", *ONE_MODEL)
        assert refused.returncode == 1 and "a mesh is already up" in refused.stdout, refused.stdout

        mesh.state_file.unlink()  # as a script might: the pid file beside the launcher's log still names it
        refused = second.cli("up", *ONE_MODEL)
        assert refused.returncode == 1 and "a mesh is already up (launcher pid" in refused.stdout, refused.stdout

        pid_file = home / "run" / "launcher.pid"
        recorded = pid_file.read_text()
        pid_file.unlink()  # both gone: the ports themselves refuse, and nothing is started or restarted
        refused = second.cli("up", *ONE_MODEL)
        assert refused.returncode == 1, refused.stdout
        assert f"gateway (port {state['ports']['gateway']})" in refused.stdout, refused.stdout
        assert "in use by another process" in refused.stdout and "started (pid" not in refused.stdout
        assert check_health(state["gateway"], 2.0, credentials) == "SERVING"
        pid_file.write_text(recorded)

        # A server started by hand on the mesh's template port does not share it: it exits, naming the port.
        port = state["ports"]["template"]
        by_hand = subprocess.run([sys.executable, "-m", "services.template"], cwd=REPO_ROOT, capture_output=True,
                                 text=True, timeout=60, env={**mesh.env(), "NLPMESH_TEMPLATE_PORT": str(port)})
        assert by_hand.returncode == PORT_IN_USE_EXIT, by_hand.stderr
        assert f"127.0.0.1:{port} is in use by another process" in by_hand.stderr
        assert "Traceback" not in by_hand.stderr
        assert check_health(state["gateway"], 2.0, credentials) == "SERVING"

        mesh.state_file.unlink(missing_ok=True)
        stopped = mesh.cli("down")
        assert stopped.returncode == 0 and "stopping it and its processes" in stopped.stdout, stopped.stdout
        wait_until(lambda: running(processes) == [], CHILDREN_GONE_S, 0.2,
                   what=lambda: f"the mesh gone; still running: {running(processes)}")
        assert not pid_file.exists()
    finally:
        for pid in running(processes):
            kill(pid, signal.SIGKILL)


def test_a_detached_mesh_outlives_the_cli_and_down_stops_it_all(home):
    mesh = Launched(home)
    try:
        started = mesh.cli("up", "--detach", "--free-ports", *ONE_MODEL, timeout_s=READY_S)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "mesh ready" in started.stdout and "running in the background" in started.stdout
        state = mesh.state()
        assert mesh.health() == "SERVING"
        processes = [state["launcher"]["pid"], *state["pids"].values()]
        assert len(running(processes)) == 9  # the launcher, seven services (edge and embedding among them), Redis

        stopped = mesh.cli("down")
        assert stopped.returncode == 0, stopped.stdout
        assert running(processes) == []
        assert not mesh.state_file.exists()
    finally:
        if mesh.state_file.exists():
            kill(mesh.state()["launcher"]["pid"], signal.SIGKILL)
        mesh.kill_everything()
