"""Every model of the shipped catalogue, converted by `make setup`: its folder is current with its source,
its architecture is the one the source says, and its tokenizer renders its chat template."""
import pytest

from meshkit.settings import default_home
from modelfiles.architectures import engine_supports
from modelfiles.catalogue import DEFAULT_MODELS_FILE, load_catalogue
from modelfiles.convert import load_model_files
from modelfiles.sources import inspect, locate, revision

pytestmark = pytest.mark.model

CATALOGUE = load_catalogue(DEFAULT_MODELS_FILE)


@pytest.mark.parametrize("model", CATALOGUE.models, ids=[model.id for model in CATALOGUE.models])
def test_each_catalogue_model_is_converted_from_its_current_source(model):
    source = locate(model)
    files = load_model_files(default_home(), model.id)
    assert files.revision == revision(source, model.chat_template), "stale: run `make model`"
    assert files.name == model.name
    if model.task == "embedding":  # unpacked, not converted: a sentence-transformers folder of a BERT
        assert files.architecture == "bert" and (files.path / "modules.json").is_file()
        return
    assert files.architecture == inspect(source).architecture
    assert files.context_length == model.context_length


def test_the_default_model_is_smollm2_and_its_engine_runs_it():
    files = load_model_files(default_home())
    assert (files.model_id, files.name, files.architecture) == ("smollm2", "SmolLM2-135M-Instruct", "llama")
    assert engine_supports(files.architecture)


def test_gemma3_renders_its_chat_template_with_its_own_control_tokens():
    from transformers import AutoTokenizer

    files = load_model_files(default_home(), "gemma3")
    assert files.architecture == "gemma3" and engine_supports("gemma3")
    tokenizer = AutoTokenizer.from_pretrained(files.path)
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "What is a bond?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nWhat is a bond?<end_of_turn>\n"
                    "<start_of_turn>model\n")
    ids = tokenizer.encode("<start_of_turn>model\n", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<start_of_turn>")
