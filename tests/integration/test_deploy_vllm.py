"""nlpmesh in front of vLLM, validated offline (vLLM needs a GPU; nothing here runs it): the vLLM catalogue
(deploy/models.vllm.toml), the compose profile (deploy/compose.vllm.yml, `--profile vllm`) and the Kubernetes
component (deploy/k8s/overlays/vllm). What runs for real is the adapter against llama.cpp's server
(tests/e2e/test_external_engine.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from cli.topology import COMPOSE_FILE, REPO_ROOT
from modelfiles.catalogue import load_catalogue
from tests.catalogue_services import ADDRS_ENV, MODEL_ENV, MODELS_TOML, coverage_problems, inference_service
from tests.k8s_render import K8S_DIR, container, env_of, find

VLLM_CATALOGUE = REPO_ROOT / "deploy" / "models.vllm.toml"
VLLM_COMPOSE = REPO_ROOT / "deploy" / "compose.vllm.yml"
COMPONENT = "overlays/vllm"
IN_IMAGE = "/app/deploy/models.vllm.toml"  # the Dockerfile's WORKDIR /app holds the repository
READS_CATALOGUE = ("tokenizer", "gateway")  # the services that must know the external entry
ADAPTER = "services.inference.external"


def test_the_vllm_catalogue_is_the_base_catalogue_and_one_external_model():
    base, vllm = load_catalogue(MODELS_TOML), load_catalogue(VLLM_CATALOGUE)
    assert vllm.ids[:len(base.ids)] == base.ids
    assert all(vllm.get(model.id) == model for model in base.models), "deploy/models.vllm.toml drifted"
    external = [model for model in vllm.models if model.external is not None]
    assert [m.id for m in external] == list(vllm.ids[len(base.ids):]) and external
    assert all(m.tokenizer in base.ids for m in external)


def external_ids() -> list[str]:
    return [m.id for m in load_catalogue(VLLM_CATALOGUE).models if m.external is not None]


@pytest.fixture
def compose() -> tuple[dict, dict]:
    return yaml.safe_load(COMPOSE_FILE.read_text()), yaml.safe_load(VLLM_COMPOSE.read_text())


def test_the_compose_profile_adds_vllm_on_a_gpu_and_an_adapter_per_external_model(compose):
    base, override = compose
    added = {name: spec for name, spec in override["services"].items() if name not in base["services"]}
    assert all(spec.get("profiles") == ["vllm"] for spec in added.values()), "every service added is in the profile"
    devices = added["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for model in external_ids():
        adapter = added[inference_service(model)]
        assert adapter["command"] == ["python", "-m", ADAPTER]
        assert adapter["environment"][MODEL_ENV] == model
        assert adapter["environment"]["NLPMESH_MODELS_FILE"] == IN_IMAGE


def test_with_the_profile_the_gateway_routes_every_model_of_the_vllm_catalogue(compose):
    base, override = compose
    def env(document: dict, name: str) -> dict:
        return document["services"].get(name, {}).get("environment") or {}

    services = {name: {"environment": {**env(base, name), **env(override, name)}}
                for name in {**base["services"], **override["services"]}}
    served = {name: spec["environment"][MODEL_ENV] for name, spec in services.items()
              if MODEL_ENV in spec["environment"]}
    assert coverage_problems(served, services["gateway"]["environment"], 50055,
                             load_catalogue(VLLM_CATALOGUE).ids) == []
    for name in (*READS_CATALOGUE, *served):
        assert services[name]["environment"].get("NLPMESH_MODELS_FILE") == IN_IMAGE, name


def test_docker_compose_validates_the_profile_where_it_is_installed():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed")
    env = {**os.environ, **dict.fromkeys(("NLPMESH_REDIS_CACHE_PASSWORD", "NLPMESH_REDIS_INFERENCE_PASSWORD",
                                          "NLPMESH_REDIS_GATEWAY_PASSWORD", "NLPMESH_VLLM_API_KEY"), "placeholder")}
    result = subprocess.run([binary, "-p", "nlpmesh", "-f", str(COMPOSE_FILE), "-f", str(VLLM_COMPOSE),
                             "--profile", "vllm", "config", "-q"], capture_output=True, text=True, timeout=60,
                            env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    """The base with the component taken in, as `kubectl kustomize` renders it (a copy: the base is unchanged)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the component is rendered by kustomize only)")
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S_DIR, root)
    with (root / "kustomization.yaml").open("a") as kustomization:
        kustomization.write(f"components:\n  - {COMPONENT}\n")
    result = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_every_object_with_the_component_is_valid_kubernetes(rendered):
    for obj in rendered:
        kubernetes_validate.validate(obj, "1.29.0", strict=True)


def test_the_component_runs_the_adapter_and_routes_the_gateway_to_it(rendered):
    catalogue = load_catalogue(VLLM_CATALOGUE)
    gateway_env = env_of(container(rendered, "gateway"))
    assert json.loads(gateway_env[ADDRS_ENV]["value"]) == {
        i: f"dns:///{inference_service(i)}:50055" for i in catalogue.ids}
    for name in READS_CATALOGUE:
        assert env_of(container(rendered, name))["NLPMESH_MODELS_FILE"]["value"] == IN_IMAGE
    for model in external_ids():
        adapter = container(rendered, inference_service(model))
        assert adapter["args"] == ["python", "-m", ADAPTER]
        assert env_of(adapter)[MODEL_ENV]["value"] == model
        assert env_of(adapter)["NLPMESH_MODELS_FILE"]["value"] == IN_IMAGE
        assert find(rendered, "Service", inference_service(model))["metadata"]["namespace"] == "nlpmesh"
    engine = find(rendered, "Service", "vllm")
    assert engine["spec"]["ports"][0]["port"] == 8000
    assert {url for m in catalogue.models if m.external for url in m.external.urls} == {"http://vllm:8000"}
