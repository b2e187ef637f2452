"""An inference process configured with a model it cannot serve refuses at start: one log line naming the
model and why, exit status 2, never a traceback. Real processes, a real catalogue file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshkit.server import START_REFUSED_EXIT

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_inference(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "NLPMESH_INFERENCE_PORT": "0", "NLPMESH_INFERENCE_METRICS_PORT": "0",
                   "NLPMESH_INFERENCE_REDIS_URL": "", "NLPMESH_TRACE_DIR": "", **env}
    return subprocess.run([sys.executable, "-m", "services.inference"], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)


def refusal(process: subprocess.CompletedProcess) -> str:
    assert process.returncode == START_REFUSED_EXIT, process.stderr[-2000:]
    assert "Traceback" not in process.stderr
    lines = [line for line in process.stderr.splitlines() if "refused to start" in line]
    assert len(lines) == 1, process.stderr[-2000:]
    return lines[0]


def test_a_model_the_catalogue_does_not_have_is_refused_naming_the_models_it_has(tmp_path):
    line = refusal(start_inference(tmp_path, NLPMESH_INFERENCE_MODEL="no-such-model"))
    assert "no-such-model" in line and "smollm2" in line and "gemma3" in line


def test_a_catalogue_model_not_converted_says_how_to_convert_it(tmp_path):
    catalogue = tmp_path / "models.toml"
    catalogue.write_text((REPO_ROOT / "deploy" / "models.toml").read_text().replace("[models.smollm2", "[models.fresh"))
    (tmp_path / "chat_templates").symlink_to(REPO_ROOT / "deploy" / "chat_templates")
    line = refusal(start_inference(tmp_path, NLPMESH_MODELS_FILE=str(catalogue), NLPMESH_INFERENCE_MODEL="fresh",
                                   NLPMESH_HOME=str(tmp_path / "home")))
    assert "fresh" in line and "modelfiles convert --model fresh" in line


@pytest.mark.model
def test_a_precision_the_catalogue_entry_excludes_is_refused(tmp_path):
    line = refusal(start_inference(tmp_path, NLPMESH_INFERENCE_MODEL="gemma3", NLPMESH_INFERENCE_DTYPE="int4"))
    assert "gemma3" in line and "int4" in line and "int8" in line
