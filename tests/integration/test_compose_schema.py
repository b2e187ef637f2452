"""docker-compose.yml validates under compose v2 and under docker-compose 1.29, and runs one
inference service per catalogue model.

docker-compose 1.29 (Debian's, what `deploy/compose-smoke.sh` runs over podman) rejects
top-level keys it does not know, `name:` among them; the project name goes on the command
line (`-p nlpmesh`) instead.
"""
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cli.topology import COMPOSE_FILE
from tests.catalogue_services import ADDRS_ENV, MODEL_ENV, catalogue_ids, coverage_problems, inference_service

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


# --- one inference service per catalogue model --------------------------------------------

def model_coverage(document: dict, ids: tuple[str, ...]) -> list[str]:
    """What the compose file lacks for the catalogue (tests/catalogue_services.py), and the
    gateway's start: it waits for the default model's service to be healthy."""
    services = document["services"]
    served = {name: spec["environment"][MODEL_ENV] for name, spec in services.items()
              if MODEL_ENV in (spec.get("environment") or {})}
    port = int(services[inference_service(ids[0])]["environment"]["NLPMESH_INFERENCE_PORT"]) \
        if inference_service(ids[0]) in services else 0
    gateway = services["gateway"]
    problems = coverage_problems(served, gateway["environment"], port, ids)
    for name in served:
        if name not in gateway.get("depends_on", {}):
            problems.append(f"gateway: no depends_on {name}")
    if gateway.get("depends_on", {}).get(inference_service(ids[0])) != {"condition": "service_healthy"}:
        problems.append(f"gateway: must wait for {inference_service(ids[0])} (the default model) to be healthy")
    if served and next(iter(served)) != inference_service(ids[0]):  # the one `nlpmesh up` runs (cli/topology.py)
        problems.append(f"the first inference service is {next(iter(served))}, not the default model's")
    return problems


@pytest.fixture
def document() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_every_catalogue_model_has_its_inference_service_and_the_gateway_routes_to_it(document):
    assert len(catalogue_ids()) >= 2
    assert model_coverage(document, catalogue_ids()) == []


def test_a_model_without_its_service_or_its_address_is_reported(document):
    default, other = catalogue_ids()[:2]
    without_service = copy.deepcopy(document)
    del without_service["services"][inference_service(other)]
    assert any(f"no inference service for catalogue model {other!r}" in p
               for p in model_coverage(without_service, catalogue_ids()))
    without_address = copy.deepcopy(document)
    env = without_address["services"]["gateway"]["environment"]
    env[ADDRS_ENV] = json.dumps({k: v for k, v in json.loads(env[ADDRS_ENV]).items() if k != other})
    assert any(ADDRS_ENV in p for p in model_coverage(without_address, catalogue_ids()))
    misnamed = copy.deepcopy(document)
    misnamed["services"][inference_service(other)]["environment"][MODEL_ENV] = default
    assert model_coverage(misnamed, catalogue_ids()) != []
    assert model_coverage(document, (*catalogue_ids(), "another")) != []  # a model added to the catalogue only
    reordered = copy.deepcopy(document)
    reordered["services"][inference_service(default)] = reordered["services"].pop(inference_service(default))
    assert any("not the default model's" in p for p in model_coverage(reordered, catalogue_ids()))
