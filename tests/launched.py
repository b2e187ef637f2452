"""`nlpmesh up` run as a user runs it, for the e2e tests that need a whole launched mesh: a subprocess in an
NLPMESH_HOME of its own, its output in a file."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cli.connect import GatewayAccess
from cli.processes import start_time
from cli.topology import REPO_ROOT
from meshkit.settings import default_home
from meshkit.tls import CA_FILE
from tests.polling import wait_until

READY_S = 300.0
ONE_MODEL = ("--model", "smollm2")  # one model starts fastest
CHILDREN_GONE_S = 20.0  # SIGTERM from the parent-death signal, the services' drain, interpreter exit


class Launched:
    """One `nlpmesh up` (on free ports unless told otherwise) in a home of its own, its output in a file.

    ``name``: the output file's (``<name>.out``), for a second launcher in the same home. ``extra_env``:
    for every command run, e.g. the services' log levels.
    """

    def __init__(self, home: Path, name: str = "up", extra_env: dict[str, str] | None = None):
        self.home = home
        self.output = home / f"{name}.out"
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env, "NLPMESH_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=timeout_s)

    def up(self, free_ports: bool = True) -> Launched:
        ports = ["--free-ports"] if free_ports else []
        with self.output.open("w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "cli.main", "up", *ports, *ONE_MODEL],
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

    def gateway_access(self) -> GatewayAccess:
        """How `nlpmesh ask` reaches this mesh's gateway: TLS with the mesh CA, the local key."""
        state = self.state()
        return GatewayAccess(state["gateway"], ca_file=Path(state["tls_dir"]) / CA_FILE,
                             api_key=(self.home / "local.key").read_text().strip())

    def log_path(self, name: str) -> Path:
        """Where the launcher writes process ``name``'s output (cli/launcher.py)."""
        return self.home / "run" / "logs" / f"{name}.log"

    def health(self, service: str = "") -> str:
        return self.cli("health", "--timeout", "2", *(["--service", service] if service else [])).stdout.strip()

    def kill_everything(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.state_file.exists():
            for pid in self.state()["pids"].values():
                kill(pid, signal.SIGCONT)
                kill(pid, signal.SIGKILL)


def kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def running(pids) -> list[int]:
    return [pid for pid in pids if start_time(pid) is not None]


def own_home(tmp_path: Path) -> Path:
    """A home of its own, with the converted models of the usual one (read-only use)."""
    (tmp_path / "models").symlink_to(default_home() / "models")
    return tmp_path
