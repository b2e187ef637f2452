"""A budgets policy for meshes whose tests are about something other than budgets.

The shipped policy (``deploy/budgets.toml``) gives the cache hop 10 ms and the template and
tokenizer hops 100 ms each. A lookup over its budget is a miss by design, and a hop over
its budget fails with DEADLINE_EXCEEDED. On a loaded 2-core CI machine either can happen
now and then, and then a test of caching or of replicas fails for a reason it does not
test. Those meshes run the shipped policy with these three hops raised. Budgets
themselves are tested with policies of their own (``tests/servicer/test_gateway_budgets.py``,
``tests/e2e/test_budgets.py``) and the shipped file in ``tests/unit/test_budgets.py``.
"""
from __future__ import annotations

import atexit
import functools
import re
import shutil
import tempfile
from pathlib import Path

from cli.topology import REPO_ROOT

SHIPPED = REPO_ROOT / "deploy" / "budgets.toml"
ROOMY_MS = 1000
RAISED = ("cache", "template", "tokenizer")
ENV = "NLPMESH_GATEWAY_BUDGETS_FILE"


def roomy_text(shipped: str) -> str:
    """``shipped`` with the ``[hops]`` budgets of ``RAISED`` at ``ROOMY_MS``; fails if one is not there."""
    head, hops_header, rest = shipped.partition("\n[hops]\n")
    assert hops_header, "no [hops] table in the shipped budgets"
    hops, section_break, tail = rest.partition("\n[")
    for hop in RAISED:
        hops, count = re.subn(rf"^{hop} = \d+$", f"{hop} = {ROOMY_MS}", hops, flags=re.MULTILINE)
        assert count == 1, f"the shipped [hops] table has no single {hop} budget"
    return head + hops_header + hops + section_break + tail


@functools.cache
def roomy_budgets() -> Path:
    """The roomy policy as a file, written once per test session (removed at exit)."""
    directory = Path(tempfile.mkdtemp(prefix="nlpmesh-budgets-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "budgets.toml"
    path.write_text(roomy_text(SHIPPED.read_text()))
    return path
