"""The contract checks of `make contract` (buf.yaml, tools/contract.sh) catch a breaking change: buf's CLI from
tools/buf (make node) on copies of protos/."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cli.topology import REPO_ROOT

BUF = REPO_ROOT / "tools" / "buf" / "node_modules" / ".bin" / "buf"
GATEWAY_PROTO = Path("protos/nlpmesh/gateway/v1/gateway.proto")

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf's CLI is not installed (make node needs npm)")


def workspace(at: Path) -> Path:
    """A copy of buf.yaml and protos/ at ``at``."""
    at.mkdir()
    shutil.copy(REPO_ROOT / "buf.yaml", at / "buf.yaml")
    shutil.copytree(REPO_ROOT / "protos", at / "protos")
    return at


def breaking(changed: Path, against: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUF), "breaking", "--against", str(against)], cwd=changed, capture_output=True,
                          text=True, timeout=120)


def test_a_changed_field_number_in_gateway_proto_breaks_the_contract(tmp_path):
    original, changed = workspace(tmp_path / "original"), workspace(tmp_path / "changed")
    unchanged = breaking(changed, original)
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr

    proto = changed / GATEWAY_PROTO
    text = proto.read_text()
    assert "  uint32 budget_ms = 6;" in text
    proto.write_text(text.replace("  uint32 budget_ms = 6;", "  uint32 budget_ms = 16;", 1))
    broken = breaking(changed, original)
    assert broken.returncode != 0
    assert 'field "6" with name "budget_ms" on message "GenerateRequest"' in broken.stdout


def test_a_new_field_is_a_compatible_change(tmp_path):
    original, changed = workspace(tmp_path / "original"), workspace(tmp_path / "changed")
    proto = changed / GATEWAY_PROTO
    proto.write_text(proto.read_text().replace("  uint32 budget_ms = 6;",
                                               "  uint32 budget_ms = 6;\n  string note = 99;", 1))
    added = breaking(changed, original)
    assert added.returncode == 0, added.stdout + added.stderr


def test_the_protos_pass_buf_lint_as_configured():
    linted = subprocess.run([str(BUF), "lint"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert linted.returncode == 0, linted.stdout + linted.stderr
