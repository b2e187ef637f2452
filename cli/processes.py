"""The launcher's children: started so that they die with it, and known again later by pid and start time.

A pid alone is not a process: once it exits, the number is handed out again. A
recorded process is the pid and its start time (``/proc/<pid>/stat``, field 22),
so a stale state file never leads anyone to signal a stranger.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

_SETPRIV = shutil.which("setpriv") if sys.platform == "linux" else None


def die_with_this_thread(command: list[str]) -> list[str]:
    """``command``, run so that the child gets SIGTERM when the thread starting it ends.

    util-linux's ``setpriv --pdeathsig`` arms Linux's parent-death signal, then execs
    the command. It is not done in a ``preexec_fn``: that makes subprocess fork()
    and run Python in the child before exec, and in a launcher that has gRPC loaded
    gRPC's fork handlers restart its poller there, on an epoll fd that ``close_fds``
    then closes: the child aborts before it execs ("Epoll1Poller ... epoll_wait
    error: Bad file descriptor", grpc/grpc#43055; seen in CI). Without a
    ``preexec_fn`` subprocess uses vfork, which runs no fork handlers.

    The signal belongs to the thread that forked the child, not to the process: spawn
    from a thread that lives as long as the children should (the main thread, or a
    supervisor thread that outlives them). A launcher that dies before setpriv armed
    the signal is caught by the service itself (``LAUNCHER_PID_ENV``, meshkit/server.py).
    Without setpriv (not Linux) the command is returned as it is, and the children die
    with the launcher only when it ends cleanly.
    """
    return [_SETPRIV, "--pdeathsig", "TERM", "--", *command] if _SETPRIV else list(command)


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None when no such process runs.

    Without /proc, a running pid gives "" (known alive, not known to be the same process).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "" if alive(pid) else None
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None  # a zombie has exited; only its parent's wait is missing
    return fields[19]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def same_process(pid: int, started: str | None) -> bool:
    """Whether ``pid`` still runs the process that was recorded with start time ``started``."""
    now = start_time(pid)
    if now is None:
        return False
    return not started or not now or now == started


def terminate_all(pids: list[int], grace_s: float) -> None:
    """SIGTERM to each, then SIGKILL to those still running after ``grace_s``."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(start_time(pid) is not None for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if start_time(pid) is not None:
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
