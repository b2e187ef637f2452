"""docker-compose.yml validates under compose v2 and under docker-compose 1.29.

docker-compose 1.29 (Debian's, what `deploy/compose-smoke.sh` runs over podman) rejects
top-level keys it does not know, `name:` among them; the project name goes on the command
line (`-p nlpmesh`) instead.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cli.topology import COMPOSE_FILE

# The top-level keys docker-compose 1.29's schema (compose_spec.json) accepts, besides `x-*`.
COMPOSE_129_TOP_LEVEL = {"version", "services", "networks", "volumes", "secrets", "configs"}
# What the file's `${VAR:?message}` interpolations need for `config` to run at all.
REQUIRED_VARIABLES = ("NLPMESH_REDIS_CACHE_PASSWORD", "NLPMESH_REDIS_INFERENCE_PASSWORD",
                      "NLPMESH_REDIS_GATEWAY_PASSWORD")


def _unknown_top_level_keys(document: dict) -> set[str]:
    return {key for key in document if key not in COMPOSE_129_TOP_LEVEL and not key.startswith("x-")}


def test_the_compose_file_has_no_top_level_key_that_compose_1_29_rejects():
    assert _unknown_top_level_keys(yaml.safe_load(COMPOSE_FILE.read_text())) == set()


def test_the_key_check_catches_a_top_level_name():
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert _unknown_top_level_keys({"name": "nlpmesh", **document}) == {"name"}


def _docker_compose_1() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (1.x) is not installed (apt-get install docker-compose)")
    version = subprocess.run([binary, "version", "--short"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0 or not version.stdout.startswith("1."):
        pytest.skip(f"docker-compose on PATH is not 1.x: {version.stdout.strip() or version.stderr.strip()}")
    return binary


def _config_quiet(binary: str, compose_file: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **{name: "placeholder" for name in REQUIRED_VARIABLES}}
    return subprocess.run([binary, "-p", "nlpmesh", "-f", str(compose_file), "config", "-q"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=compose_file.parent)


def test_docker_compose_1_29_validates_the_compose_file():
    binary = _docker_compose_1()
    result = _config_quiet(binary, COMPOSE_FILE)
    assert result.returncode == 0, result.stderr


def test_docker_compose_1_29_validates_the_smoke_override_with_it():
    binary = _docker_compose_1()
    env = {**os.environ, **{name: "placeholder" for name in REQUIRED_VARIABLES},
           "NLPMESH_SMOKE_DIR": "/tmp/nlpmesh-smoke-placeholder"}
    override = COMPOSE_FILE.parent / "deploy" / "compose.smoke.yml"
    result = subprocess.run([binary, "-p", "nlpmesh", "-f", str(COMPOSE_FILE), "-f", str(override),
                             "config", "-q"], capture_output=True, text=True, timeout=60, env=env,
                            cwd=COMPOSE_FILE.parent)
    assert result.returncode == 0, result.stderr


def test_docker_compose_1_29_rejects_the_file_with_a_top_level_name(tmp_path):
    """The check above is a real one: the same file with `name:` back fails it."""
    binary = _docker_compose_1()
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("name: nlpmesh\n" + COMPOSE_FILE.read_text())
    result = _config_quiet(binary, broken)
    assert result.returncode != 0
    assert "name" in result.stderr
