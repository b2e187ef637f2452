"""Waiting for state in tests: poll a condition, bounded in time and in tries, and fail naming it.

A fixed sleep either waits too long or, on a slow machine, not long enough; a poll
returns as soon as the condition holds and says what never happened when it does not.
"""
from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Callable

import pytest


def _tries(timeout_s: float, every_s: float) -> int:
    return max(1, math.ceil(timeout_s / every_s) + 1)


def _failure(what: str | Callable[[], str], timeout_s: float, tries: int) -> str:
    said = what() if callable(what) else what
    return f"timed out waiting for {said} ({timeout_s}s, {tries} tries)"


def wait_until(predicate, timeout_s: float = 10.0, every_s: float = 0.05, what: str | Callable[[], str] = "a condition"):
    """Calls ``predicate()`` until it returns something truthy, and returns that.

    Fails the test after ``timeout_s`` or as many tries as fit in it, whichever comes
    first; ``what`` (or what it returns, called only then) says what was awaited.
    """
    deadline = time.monotonic() + timeout_s
    tries = _tries(timeout_s, every_s)
    for attempt in range(1, tries + 1):
        value = predicate()
        if value:
            return value
        if attempt == tries or time.monotonic() >= deadline:
            break
        time.sleep(every_s)
    pytest.fail(_failure(what, timeout_s, attempt))


async def until(predicate, timeout_s: float = 5.0, every_s: float = 0.02, what: str | Callable[[], str] = "a condition"):
    """``wait_until`` inside an event loop: ``predicate()`` may return a value or an awaitable of one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    tries = _tries(timeout_s, every_s)
    for attempt in range(1, tries + 1):
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if attempt == tries or loop.time() >= deadline:
            break
        await asyncio.sleep(every_s)
    pytest.fail(_failure(what, timeout_s, attempt))
