"""Which models `nlpmesh up` and `nlpmesh demo` serve when none is named: the converted catalogue models the
built-in engine runs, each other one named with the reason."""
import json

from cli.models import servable_models
from modelfiles.catalogue import MODELS_FILE_ENV

CATALOGUE = """
[models.small]
source = { kind = "pypi", package = "small", file = "s.gguf" }
[models.gem]
source = { kind = "pypi", package = "gem", file = "g.gguf" }
[models.later]
source = { kind = "pypi", package = "later", file = "l.gguf" }
"""


def converted(home, model: str, model_type: str) -> None:
    folder = home / "models" / model
    folder.mkdir(parents=True)
    (folder / "nlpmesh-model.json").write_text(json.dumps({"id": model, "name": model, "revision": "r1"}))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))


def test_converted_models_the_engine_runs_are_served_and_each_other_is_named_with_why(tmp_path, monkeypatch):
    (tmp_path / "models.toml").write_text(CATALOGUE)
    monkeypatch.setenv(MODELS_FILE_ENV, str(tmp_path / "models.toml"))
    converted(tmp_path, "small", "llama")
    converted(tmp_path, "gem", "mamba")  # an architecture the engine is not about to learn
    servable, not_served = servable_models(tmp_path)
    assert servable == ["small"]
    assert not_served == ["gem: the built-in engine does not run mamba models yet",
                          "later: not converted (python -m modelfiles convert --model later)"]
