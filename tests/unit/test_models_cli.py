"""`nlpmesh models list` on a catalogue the test writes: one row per model, refusals on lines of their own."""
import json

from cli.main import main
from tests.unit.test_model_sources import write_gguf, write_hf_folder


def catalogue(tmp_path) -> str:
    write_gguf(tmp_path / "tiny.gguf", "llama", context_length=2048)
    write_hf_folder(tmp_path / "gpt", model_type="gpt2")
    path = tmp_path / "models.toml"
    path.write_text('[models.tiny]\nsource = { kind = "gguf", path = "tiny.gguf" }\nprecisions = ["int8"]\n'
                    '[models.gem]\nsource = { kind = "gguf", path = "gem.gguf" }\n'
                    '[models.gpt]\nsource = { kind = "hf", path = "gpt" }\n')
    write_gguf(tmp_path / "gem.gguf", "gemma3", context_length=4096)
    return str(path)


def rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines()[1:4]}


def test_models_list_shows_each_model_and_refuses_the_unsupported_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NLPMESH_HOME", str(tmp_path / "home"))
    code = main(["models", "list", "--file", catalogue(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[0].split() == ["ID", "SOURCE", "REVISION", "ARCHITECTURE", "CONTEXT", "CONVERTED",
                                           "PRECISION"]
    tiny, gem, gpt = rows(out)["tiny"], rows(out)["gem"], rows(out)["gpt"]
    assert tiny[4:] == ["llama", "2048", "no", "int8"]
    assert gem[4:] == ["gemma3", "4096", "no", "auto", "(chosen", "at", "start)"]
    assert gpt[4:] == ["-", "-", "-", "no", "auto", "(chosen", "at", "start)"]
    assert "refused: model gpt: architecture 'gpt2' is not supported; supported: llama, gemma3" in out
    assert "Traceback" not in out


def test_a_converted_model_shows_as_converted_and_stale_once_its_source_changes(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("NLPMESH_HOME", str(home))
    path = catalogue(tmp_path)
    revision = rows((main(["models", "list", "--file", path]), capsys.readouterr().out)[1])["tiny"][3]
    folder = home / "models" / "tiny"
    folder.mkdir(parents=True)
    (folder / "nlpmesh-model.json").write_text(json.dumps({"name": "tiny", "revision": revision}))
    assert rows((main(["models", "list", "--file", path]), capsys.readouterr().out)[1])["tiny"][6] == "yes"
    write_gguf(tmp_path / "tiny.gguf", "llama", context_length=4096)
    assert rows((main(["models", "list", "--file", path]), capsys.readouterr().out)[1])["tiny"][6:8] == [
        "stale", f"({revision})"]


def test_a_catalogue_with_a_typo_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    path = tmp_path / "models.toml"
    path.write_text('[models.tiny]\nsorce = { kind = "gguf", path = "tiny.gguf" }\n')
    assert main(["models", "list", "--file", str(path)]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "model 'tiny', field 'sorce': unknown field" in out
