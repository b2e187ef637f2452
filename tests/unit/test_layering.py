"""The layering the design card promises: no service imports another service's package,
and the runtime floor (meshkit/, promptcache/) imports nothing above it.

Wire contracts shared by two processes live in ``meshkit/wire.py``; a service that
reaches into another's package for one fails here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").is_file())


def _imported_modules(path: Path) -> list[str]:
    """Every absolute module name ``path`` imports, at any depth in the file."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _package_of(module: str) -> str | None:
    """``gateway``, ``services.<name>``, or None for anything below the services."""
    parts = module.split(".")
    if parts[0] == "gateway":
        return "gateway"
    if parts[0] == "services" and len(parts) > 1:
        return f"services.{parts[1]}"
    return None


def _foreign_imports(directory: Path, own: str, base: Path = ROOT) -> list[str]:
    """Each import under ``directory`` of a service package other than ``own``."""
    return [f"{path.relative_to(base)} imports {module}"
            for path in sorted(directory.rglob("*.py"))
            for module in _imported_modules(path)
            if _package_of(module) not in (None, own)]


@pytest.mark.parametrize("package", ["gateway", *(f"services.{name}" for name in SERVICES)])
def test_no_service_imports_another_services_package(package):
    assert _foreign_imports(ROOT.joinpath(*package.split(".")), package) == []


@pytest.mark.parametrize("floor", ["meshkit", "promptcache"])
def test_the_runtime_floor_imports_no_service(floor):
    assert _foreign_imports(ROOT / floor, own="") == []


def test_the_check_sees_a_cross_service_import(tmp_path):
    (tmp_path / "servicer.py").write_text("from services.inference.engine import Engine\nimport gateway.budgets\n")
    assert _foreign_imports(tmp_path, "services.tokenizer", base=tmp_path) == [
        "servicer.py imports services.inference.engine", "servicer.py imports gateway.budgets"]


def test_the_gateway_is_a_top_level_package_beside_the_services():
    assert (ROOT / "gateway" / "__main__.py").is_file()
    assert not (ROOT / "services" / "gateway").exists()
