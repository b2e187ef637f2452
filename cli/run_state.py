"""The running mesh's state file ($NLPMESH_HOME/run/mesh.json): who launched it, its processes and addresses.

The launcher writes it when it starts, rewrites it whenever a process is replaced
and removes it when it stops. A file whose launcher is gone is stale: whatever of
its processes still run are stopped, and the file is replaced.

Beside it, next to the launcher's log, the launcher's pid file (``launcher.pid``: its pid and
start time) is written once and removed when the launcher stops: a script that removes the
state file leaves it, so `up` still refuses and `down` still finds the launcher.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from cli.processes import same_process, start_time, terminate_all


def read(path: Path) -> dict | None:
    """The state, or None when there is no file; a file that does not parse reads as a stale, empty one."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def write(path: Path, state: dict) -> None:
    """Replaces the file in one step, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(state))
    partial.replace(path)


def this_launcher() -> dict:
    return {"pid": os.getpid(), "started": start_time(os.getpid()) or ""}


def pid_file(path: Path) -> Path:
    """The launcher's pid file beside the state file ``path``."""
    return path.with_name("launcher.pid")


def claim(path: Path) -> None:
    """Records this process as the launcher in the pid file beside ``path``."""
    write(pid_file(path), {"launcher": this_launcher()})


def release(path: Path) -> None:
    """Removes the pid file beside ``path`` when it names this process."""
    if written_by_me(read(pid_file(path))):
        pid_file(path).unlink(missing_ok=True)


def running_launcher(path: Path) -> int | None:
    """The pid of the launcher the pid file beside ``path`` names, when that very process (same start time)
    still runs; a pid file whose launcher is gone is removed."""
    recorded = read(pid_file(path))
    if recorded is None:
        return None
    if launcher_running(recorded) and not written_by_me(recorded):
        return recorded["launcher"]["pid"]
    if not written_by_me(recorded):
        pid_file(path).unlink(missing_ok=True)
    return None


def launcher_running(state: dict) -> bool:
    launcher = state.get("launcher") or {}
    return bool(launcher) and same_process(launcher["pid"], launcher.get("started"))


def written_by_me(state: dict | None) -> bool:
    return bool(state) and (state.get("launcher") or {}).get("pid") == os.getpid()


def leftovers(state: dict) -> dict[str, int]:
    """The recorded processes (not the launcher) still running, by name."""
    started = state.get("started") or {}
    return {name: pid for name, pid in (state.get("pids") or {}).items() if same_process(pid, started.get(name))}


def describe(state: dict) -> str:
    launcher = (state.get("launcher") or {}).get("pid")
    return f"launcher pid {launcher}, gateway at {state.get('gateway', '?')}" if launcher else "no launcher recorded"


def clear_if_stale(path: Path, say: Callable[[str], None], grace_s: float = 10.0) -> bool:
    """True when ``path`` is free for a new launcher: absent, or stale and now removed (its leftovers stopped).

    False while the launcher that wrote it still runs.
    """
    state = read(path)
    if state is None:
        return True
    if launcher_running(state):
        return False
    left = leftovers(state)
    say(f"{path} is stale ({describe(state)}, which is no longer running): replacing it"
        + (f"; stopping what it left: {', '.join(f'{n} (pid {p})' for n, p in left.items())}" if left else ""))
    terminate_all(list(left.values()), grace_s)
    path.unlink(missing_ok=True)
    return True


def stop(path: Path, say: Callable[[str], None], grace_s: float = 10.0) -> list[str]:
    """Stops the mesh ``path`` records (its launcher, then anything left) and removes the file; the names stopped.

    Without the file, the launcher its pid file names is stopped (its processes die with it).
    """
    state = read(path)
    if state is None:
        return stop_unrecorded(path, say, grace_s)
    names = list(leftovers(state))
    if launcher_running(state):
        pid = state["launcher"]["pid"]
        say(f"stopping the launcher (pid {pid}) and its processes")
        terminate_all([pid], grace_s + 10.0)  # the launcher gives its children grace_s, then kills them
    else:
        say(f"{path} was stale ({describe(state)}, which is no longer running): removing it")
    left = leftovers(state)
    if left:
        say(f"stopping what is left: {', '.join(left)}")
        terminate_all(list(left.values()), grace_s)
    deadline = time.monotonic() + 2.0
    while leftovers(state) and time.monotonic() < deadline:
        time.sleep(0.05)
    path.unlink(missing_ok=True)
    pid_file(path).unlink(missing_ok=True)
    return names


def stop_unrecorded(path: Path, say: Callable[[str], None], grace_s: float = 10.0) -> list[str]:
    """Stops the launcher the pid file beside ``path`` names, when the state file is gone; ["launcher"] or []."""
    pid = running_launcher(path)
    if pid is None:
        return []
    say(f"{path} is gone, but the launcher in {pid_file(path)} (pid {pid}) runs: stopping it and its processes")
    terminate_all([pid], grace_s + 10.0)  # the launcher gives its children grace_s, then kills them
    pid_file(path).unlink(missing_ok=True)
    return ["launcher"]
