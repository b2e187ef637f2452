"""The running mesh's state file ($NLPMESH_HOME/run/mesh.json): who launched it, its processes and addresses.

The launcher writes it when it starts, rewrites it whenever a process is replaced
and removes it when it stops. A file whose launcher is gone is stale: whatever of
its processes still run are stopped, and the file is replaced.
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
    """Stops the mesh ``path`` records (its launcher, then anything left) and removes the file; the names stopped."""
    state = read(path)
    if state is None:
        return []
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
    return names
