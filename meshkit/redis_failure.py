"""One policy for a Redis that fails: how the failure is told in a log line, and how long Redis is left alone.

Used by every Redis user that degrades rather than fails: the prompt cache
(promptcache/redis_tier.py), the gateway's quotas (gateway/quotas.py) and the
prefix KV tier (services/inference/prefix.py).

Describing: an error's text may quote a key, a value or a script's reply (a
prompt, an answer, a tenant's key), so a description names a fixed category
and the exception's class, never its message.

Backing off: after a failure, Redis is not called for ``cooldown_s``; the first
call after that tries again. A failure where Redis answered with an error
(``refused``: out of memory under ``noeviction``, a command the ACL user may
not run) pauses writes only, because reads still work; any other failure
(unreachable, timed out) pauses reads and writes alike.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import redis.exceptions

# What a failing Redis raises: redis-py's errors, the cluster client's own
# (no reachable node, say, which is no RedisError), a socket's, a timeout's.
REDIS_FAILURES = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError, TimeoutError)

TIMED_OUT = "timed out"
UNREACHABLE = "unreachable"
REFUSED = "refused"  # Redis answered, with an error
FAILED = "failed"  # anything else


def failure_category(error: BaseException) -> str:
    """One of TIMED_OUT, UNREACHABLE, REFUSED, FAILED."""
    if isinstance(error, (TimeoutError, redis.exceptions.TimeoutError)):
        return TIMED_OUT
    if isinstance(error, redis.exceptions.ResponseError):
        return REFUSED
    if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.RedisClusterException, OSError)):
        return UNREACHABLE
    return FAILED


def describe_failure(error: BaseException) -> str:
    """``"<category> (<exception class>)"``: never the error's text, which may quote keys or values."""
    return f"{failure_category(error)} ({type(error).__name__})"


class RedisBackoff:
    """When to leave Redis alone after a failure. ``clock``: monotonic seconds (injected in tests).

    Thread-safe enough for its use: each field is one float, set whole.
    """

    def __init__(self, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        if cooldown_s < 0:
            raise ValueError("a Redis cooldown may not be negative")
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._all_paused_until = -math.inf
        self._writes_paused_until = -math.inf
        self._failing = False  # since the last failure, no call has been answered
        self.failures = 0  # every failure reported, for tests and logs

    def may_read(self) -> bool:
        """False during a cooldown after Redis was unreachable or slow."""
        return self._clock() >= self._all_paused_until

    def may_write(self) -> bool:
        """False during a cooldown after any failure, a refused write included."""
        return self._clock() >= max(self._all_paused_until, self._writes_paused_until)

    def failed(self, error: BaseException) -> bool:
        """Starts a cooldown for ``error``; True when none of its kind was running (worth one warning)."""
        now = self._clock()
        self._failing = True
        self.failures += 1
        if failure_category(error) == REFUSED:
            started = now >= self._writes_paused_until
            self._writes_paused_until = now + self.cooldown_s
            return started
        started = now >= self._all_paused_until
        self._all_paused_until = now + self.cooldown_s
        return started

    def answered(self) -> bool:
        """Redis answered a call; True when that ends a run of failures (worth one line)."""
        recovered, self._failing = self._failing, False
        return recovered
