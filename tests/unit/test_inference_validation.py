"""Request checks: every bad field is named as the public API names it."""
import pytest

from meshkit.errors import InvalidArgument
from meshkit.sampling import Sampling
from services.inference.generation_types import GenerationRequest
from services.inference.validation import RequestLimits, resolve_request

LIMITS = RequestLimits(
    context_length=100, vocab_size=1000, default_max_new_tokens=30, max_new_tokens_limit=50
)


def request(prompt=(5, 6, 7), **sampling):
    return GenerationRequest(list(prompt), Sampling(**sampling), "r1")


def violated_fields(req):
    with pytest.raises(InvalidArgument) as caught:
        resolve_request(req, LIMITS)
    return [v.field for v in caught.value.violations]


@pytest.mark.parametrize(
    "sampling, field",
    [
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"temperature": float("nan")}, "sampling.temperature"),
        ({"temperature": 1e9}, "sampling.temperature"),
        ({"top_k": 1001}, "sampling.top_k"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"top_p": -0.2}, "sampling.top_p"),
        ({"top_k": -1}, "sampling.top_k"),
        ({"max_new_tokens": 51}, "sampling.max_new_tokens"),
        ({"stop": ("a", "b", "c", "d", "e")}, "sampling.stop"),
        ({"stop": ("x" * 65,)}, "sampling.stop"),
        ({"stop": ("",)}, "sampling.stop"),
    ],
)
def test_bad_sampling_fields_are_named(sampling, field):
    assert violated_fields(request(**sampling)) == [field]


def test_every_bad_field_is_reported_at_once():
    fields = violated_fields(request(prompt=(), temperature=-1, top_p=2))
    assert fields == ["sampling.temperature", "sampling.top_p", "prompt"]


@pytest.mark.parametrize("prompt", [(), (5, 1000), (-1,), tuple(range(100))])
def test_bad_prompts_are_named_prompt(prompt):
    assert violated_fields(request(prompt=prompt)) == ["prompt"]


def test_prompt_plus_max_new_tokens_over_the_context_is_a_prompt_error():
    assert violated_fields(request(prompt=range(60), max_new_tokens=41)) == ["prompt"]
    fits = resolve_request(request(prompt=range(60), max_new_tokens=40), LIMITS)
    assert fits.sampling.max_new_tokens == 40


def test_defaults_are_filled_in():
    resolved = resolve_request(request(), LIMITS).sampling
    assert resolved.max_new_tokens == 30 and resolved.top_p == 1.0


def test_the_default_length_shrinks_to_fit_the_context():
    resolved = resolve_request(request(prompt=range(90)), LIMITS).sampling
    assert resolved.max_new_tokens == 10


def test_the_engine_options_are_the_settings_of_the_same_names(monkeypatch):
    import dataclasses

    from services.inference.engine import EngineOptions
    from services.inference.settings import InferenceSettings

    monkeypatch.delenv("NLPMESH_INFERENCE_MAX_QUEUE", raising=False)
    assert InferenceSettings().engine_options() == EngineOptions()  # one set of defaults
    monkeypatch.setenv("NLPMESH_INFERENCE_MAX_QUEUE", "5")
    options = InferenceSettings(max_running=3).engine_options()
    assert options == dataclasses.replace(EngineOptions(), max_running=3, max_queue=5)
