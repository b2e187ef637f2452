"""`nlpmesh up` as a user runs it (a subprocess, TLS and API keys on, its own NLPMESH_HOME): it cleans up after
itself however it is stopped, restarts what crashes, and the gateway's health says what it can serve."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.processes import start_time
from cli.topology import REPO_ROOT
from gateway.downstream_health import CACHE_PATH
from meshkit.settings import default_home
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

READY_S = 300.0
ONE_MODEL = ("--model", "smollm2")  # these tests are about the launcher: one model starts fastest
CHILDREN_GONE_S = 20.0  # SIGTERM from the parent-death signal, the services' drain, interpreter exit


class Launched:
    """One `nlpmesh up --free-ports` in a home of its own, its output in a file."""

    def __init__(self, home: Path):
        self.home = home
        self.output = home / "up.out"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "NLPMESH_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=timeout_s)

    def up(self) -> Launched:
        with self.output.open("w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--free-ports", *ONE_MODEL],
                                            cwd=REPO_ROOT,
                                            env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: "mesh ready" in self.said() or self.process.poll() is not None, READY_S, 0.5,
                   what="the mesh ready")
        assert self.process.poll() is None, self.said()
        return self

    def said(self) -> str:
        return self.output.read_text(errors="replace")

    @property
    def state_file(self) -> Path:
        return self.home / "run" / "mesh.json"

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def health(self, service: str = "") -> str:
        return self.cli("health", "--timeout", "2", *(["--service", service] if service else [])).stdout.strip()

    def kill_everything(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.state_file.exists():
            for pid in self.state()["pids"].values():
                _kill(pid, signal.SIGCONT)
                _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _running(pids) -> list[int]:
    return [pid for pid in pids if start_time(pid) is not None]


@pytest.fixture
def home(tmp_path) -> Path:
    """A home of its own, with the converted model of the usual one (read-only use)."""
    (tmp_path / "models").symlink_to(default_home() / "models")
    return tmp_path


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
        assert _running(children) == []
    finally:
        mesh.kill_everything()


def test_a_sigkilled_launcher_takes_its_children_with_it_and_down_twice_is_fine(home):
    mesh = Launched(home)
    try:
        mesh.up()
        children = list(mesh.state()["pids"].values())
        assert len(_running(children)) == 6  # five services and the private Redis
        mesh.process.kill()
        mesh.process.wait()
        started = time.monotonic()
        wait_until(lambda: _running(children) == [], CHILDREN_GONE_S, 0.2,
                   what=lambda: f"the children gone; still running: {_running(children)}")
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
        assert len(_running(processes)) == 7  # the launcher, five services, Redis

        stopped = mesh.cli("down")
        assert stopped.returncode == 0, stopped.stdout
        assert _running(processes) == []
        assert not mesh.state_file.exists()
    finally:
        if mesh.state_file.exists():
            _kill(mesh.state()["launcher"]["pid"], signal.SIGKILL)
        mesh.kill_everything()
