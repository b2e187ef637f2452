"""When the local launcher restarts a process that exited: compose's `restart: unless-stopped`, with backoff."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # A process that ran this long before it exited is restarted after first_delay_s again.
    reset_after_s: float = 30.0


class Backoff:
    """One process's restart delays: first_delay_s, doubling up to max_delay_s, reset after a long run."""

    def __init__(self, policy: RestartPolicy):
        self._policy = policy
        self._next = policy.first_delay_s
        self.restarts = 0

    def delay_after(self, ran_s: float) -> float:
        """The wait before restarting a process that exited after running ``ran_s`` seconds."""
        if ran_s >= self._policy.reset_after_s:
            self._next = self._policy.first_delay_s
        delay = self._next
        self._next = min(self._next * 2, self._policy.max_delay_s)
        self.restarts += 1
        return delay
