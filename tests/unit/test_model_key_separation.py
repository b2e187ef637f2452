"""Two models, or two revisions of one, never share a prefix-KV block: the inference service builds its prefix
cache (services/inference/loading.py) keyed by the catalogue id and revision of the model it serves. (The
prompt cache's side, through the gateway: tests/servicer/test_gateway_models.py.)"""
from pathlib import Path

from modelfiles.convert import ModelFiles
from services.inference.loading import prefix_cache
from services.inference.settings import InferenceSettings

PROMPT = list(range(40))


def keys_of(model_id: str, revision: str) -> list[bytes]:
    files = ModelFiles(name="SmolLM2-135M-Instruct", path=Path("/nonexistent"), revision=revision, model_id=model_id)
    cache = prefix_cache(InferenceSettings(redis_url="", prefix_cache_bytes=1 << 20), files)
    return cache.keys("tenant", PROMPT)


def test_the_same_model_and_revision_share_their_blocks():
    assert keys_of("smollm2", "r1") == keys_of("smollm2", "r1") != []


def test_two_catalogue_ids_of_one_source_share_no_block():
    # Both point at the same weights (one revision) and report the same name: only the id tells them apart.
    assert not set(keys_of("smollm2", "r1")) & set(keys_of("smollm2-b", "r1"))


def test_two_revisions_of_one_model_share_no_block():
    assert not set(keys_of("smollm2", "r1")) & set(keys_of("smollm2", "r2"))
