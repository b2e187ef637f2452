"""tests/unit is in-process (tests/in_process.py): no process, no socket it did not open.

Hooks, not an autouse fixture: a session fixture (a private redis-server) is set up
before any function-scoped one, and must be refused too. Teardown is left alone.
"""
from __future__ import annotations

import pytest

from tests.in_process import in_process_only

WHERE = "tests/unit"


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("model") and item.path.is_relative_to(item.config.rootpath / WHERE):
            raise pytest.UsageError(f"{item.nodeid} is marked model: a test of the real model belongs in tests/integration")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with in_process_only(WHERE):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with in_process_only(WHERE):
        return (yield)
