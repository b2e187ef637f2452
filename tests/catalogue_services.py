"""What docker-compose.yml and deploy/k8s must hold for the model catalogue (deploy/models.toml):
one inference service per model, named after it, and the gateway's map of them.

Read by tests/integration/test_compose_schema.py and test_k8s_manifests.py, so both deploy
files follow one rule.
"""
from __future__ import annotations

import json

from cli.topology import REPO_ROOT
from modelfiles.catalogue import load_catalogue

MODELS_TOML = REPO_ROOT / "deploy" / "models.toml"
ADDRS_ENV = "NLPMESH_GATEWAY_INFERENCE_ADDRS"
DEFAULT_MODEL_ENV = "NLPMESH_GATEWAY_DEFAULT_MODEL"
MODEL_ENV = "NLPMESH_INFERENCE_MODEL"


def catalogue_ids() -> tuple[str, ...]:
    """The catalogue's ids, the default (the first) first; the repository's file, not $NLPMESH_MODELS_FILE."""
    return load_catalogue(MODELS_TOML).ids


def inference_service(model_id: str) -> str:
    return f"inference-{model_id}"


def coverage_problems(served: dict[str, str], gateway_env: dict[str, str], port: int,
                      ids: tuple[str, ...]) -> list[str]:
    """Every way the deploy falls short of the catalogue; empty when it serves each model.

    ``served``: each inference service's name -> the model it serves (its NLPMESH_INFERENCE_MODEL);
    ``gateway_env``: the gateway's variables; ``port``: inference's gRPC port.
    """
    problems = [f"{name} serves {model!r}: a service serving a model is named {inference_service(model)}"
                for name, model in served.items() if name != inference_service(model)]
    problems += [f"no inference service for catalogue model {i!r}" for i in ids if inference_service(i) not in served]
    problems += [f"{name} serves {model!r}, not in the catalogue" for name, model in served.items() if model not in ids]
    try:
        addrs = json.loads(gateway_env.get(ADDRS_ENV, ""))
    except json.JSONDecodeError:
        return [*problems, f"gateway: {ADDRS_ENV} is not a JSON object: {gateway_env.get(ADDRS_ENV)!r}"]
    wanted = {i: f"dns:///{inference_service(i)}:{port}" for i in ids}
    if addrs != wanted:
        problems.append(f"gateway: {ADDRS_ENV} is {addrs}, the catalogue wants {wanted}")
    if gateway_env.get(DEFAULT_MODEL_ENV) != ids[0]:
        problems.append(f"gateway: {DEFAULT_MODEL_ENV} is {gateway_env.get(DEFAULT_MODEL_ENV)!r}, "
                        f"the catalogue's default is {ids[0]!r}")
    return problems
