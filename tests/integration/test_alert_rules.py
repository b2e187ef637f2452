"""The Prometheus rules (deploy/prometheus/rules): promtool's own tests pass, and every alert has a promtool case
where it fires and one where it stays quiet, and a runbook in docs/operating/alerts.md."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules"
TESTS = ROOT / "deploy" / "prometheus" / "tests"
RUNBOOKS = ROOT / "docs" / "operating" / "alerts.md"


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for path in sorted(RULES.glob("*.yml"))
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"] if "alert" in rule}


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="needs promtool (Debian's prometheus package; .ci/run installs it)")
def test_promtool_checks_the_rules_and_passes_their_tests():
    checked = subprocess.run(["promtool", "check", "rules", *map(str, sorted(RULES.glob("*.yml")))],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(["promtool", "test", "rules", *(p.name for p in sorted(TESTS.glob("*.yml")))],
                            cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_case_that_fires_it_and_one_that_does_not():
    fires, quiet = set(), set()
    for path in TESTS.glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alerts()) - fires == set()
    assert set(alerts()) - quiet == set()


def test_every_alert_has_a_runbook_its_annotation_points_at():
    headings = {re.sub(r"[^a-z0-9]", "", line.lstrip("#").strip().lower())
                for line in RUNBOOKS.read_text().splitlines() if line.startswith("### ")}
    for name, rule in alerts().items():
        assert name.lower() in headings, f"{name}: no '### {name}' in {RUNBOOKS.name}"
        assert rule["annotations"]["runbook"] == f"docs/operating/alerts.md#{name.lower()}"
        assert rule["labels"]["severity"] in {"page", "ticket"}
