"""Several models (`nlpmesh up --model smollm2 --model gemma3`): inference processes per model, and what tells
each process which model it serves or routes to."""
import json

import pytest

from cli.launcher import LocalMesh
from cli.main import _scale_of, parser
from cli.topology import model_environment


def test_each_model_gets_inference_processes_of_its_own_the_first_named_as_before(tmp_path):
    mesh = LocalMesh(tmp_path, models=("smollm2", "gemma3"), scale={"inference": 2})
    assert mesh.model_instances == {"smollm2": ["inference", "inference-2"],
                                    "gemma3": ["inference-gemma3", "inference-gemma3-2"]}
    names = list(mesh.instances)
    assert names.index("inference-gemma3-2") < names.index("gateway")
    assert mesh.replicas("inference") == ["inference", "inference-2", "inference-gemma3", "inference-gemma3-2"]


def test_without_models_the_mesh_serves_the_catalogues_default_only(tmp_path):
    assert LocalMesh(tmp_path).model_instances == {"smollm2": ["inference"]}


@pytest.mark.parametrize("models, why", [(("gpt-9",), "gpt-9; the catalogue"), (("smollm2", "smollm2"), "twice")])
def test_a_model_not_in_the_catalogue_or_named_twice_is_refused_before_anything_starts(tmp_path, models, why):
    with pytest.raises(ValueError, match=why):
        _ = LocalMesh(tmp_path, models=models).instances


def test_each_process_learns_its_models():
    models = {"smollm2": ["inference", "inference-2"], "gemma3": ["inference-gemma3"]}
    ports = {"inference": 1, "inference-2": 2, "inference-gemma3": 3}
    gateway = model_environment("gateway", "gateway", models, ports)
    assert json.loads(gateway["NLPMESH_GATEWAY_INFERENCE_ADDRS"]) == {
        "smollm2": "ipv4:127.0.0.1:1,127.0.0.1:2", "gemma3": "127.0.0.1:3"}
    assert gateway["NLPMESH_GATEWAY_DEFAULT_MODEL"] == "smollm2"
    assert model_environment("inference", "inference-2", models, ports) == {"NLPMESH_INFERENCE_MODEL": "smollm2"}
    assert model_environment("inference", "inference-gemma3", models, ports) == {"NLPMESH_INFERENCE_MODEL": "gemma3"}
    assert model_environment("tokenizer", "tokenizer", models, ports) == {"NLPMESH_TOKENIZER_MODELS": "smollm2,gemma3"}
    assert model_environment("template", "template", models, ports) == {}


def test_up_takes_repeated_models_and_inference_replicas_per_model():
    args = parser().parse_args(["up", "--model", "smollm2", "--model", "gemma3", "--inference-replicas", "2"])
    assert args.model == ["smollm2", "gemma3"]
    assert _scale_of(args) == {"inference": 2}
    assert parser().parse_args(["ask", "hi", "--model", "gemma3"]).model == "gemma3"
