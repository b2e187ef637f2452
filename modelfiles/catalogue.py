"""The model catalogue (``deploy/models.toml``): which models this mesh may serve, and from where.

Read at start (``load_catalogue``), never at import; ``NLPMESH_MODELS_FILE`` names another file.
Every field is checked, and a key that is not one of them is refused rather than ignored, so a typo
cannot silently fall back to a default. Each error names the entry and the field. The file format is
documented in docs/models.md.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from meshkit.sampling import Sampling

MODELS_FILE_ENV = "NLPMESH_MODELS_FILE"
DEFAULT_MODELS_FILE = Path(__file__).resolve().parents[1] / "deploy" / "models.toml"
# The precisions a model may be allowed to run in: services/inference/precision.py's, and auto
# (tests/unit/test_model_catalogue.py keeps the two lists the same).
PRECISIONS = ("auto", "int4", "int8", "bfloat16", "float32")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop")
_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ENTRY_FIELDS = {"name", "source", "chat_template", "context_length", "sampling", "precisions"}


class CatalogueError(ValueError):
    """The catalogue file is missing, not TOML, or an entry in it is wrong (the message says which)."""


@dataclass(frozen=True)
class PypiSource:
    """A GGUF file inside an installed PyPI package, or split over several (``parts``, joined in order;
    each part package holds one file named ``<file>.part*``)."""

    package: str
    file: str
    parts: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"pypi {self.package}: {self.file}" + (f" ({len(self.parts)} parts)" if self.parts else "")


@dataclass(frozen=True)
class GgufFileSource:
    """A local ``.gguf`` file."""

    path: Path

    def describe(self) -> str:
        return f"gguf {self.path}"


@dataclass(frozen=True)
class HfFolderSource:
    """A local Hugging Face folder: config.json, *.safetensors and the tokenizer's files."""

    path: Path

    def describe(self) -> str:
        return f"hf folder {self.path}"


Source = PypiSource | GgufFileSource | HfFolderSource


@dataclass(frozen=True)
class CatalogueModel:
    id: str  # what callers put in `model`
    name: str  # the name the model reports (ModelInfo.model); the id unless the entry says otherwise
    source: Source
    chat_template: Path | None  # a Jinja file overriding the model's own; None = the model's own
    context_length: int | None  # None = the model's own
    sampling: Sampling  # the defaults a request's unset fields take
    precisions: tuple[str, ...]  # the CPU precisions the engine may run it in


@dataclass(frozen=True)
class Catalogue:
    path: Path
    models: tuple[CatalogueModel, ...]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(model.id for model in self.models)

    def get(self, model_id: str) -> CatalogueModel:
        for model in self.models:
            if model.id == model_id:
                return model
        raise CatalogueError(f"{self.path}: no model {model_id!r}; the catalogue has {', '.join(self.ids)}")


def models_file() -> Path:
    """The catalogue file: ``$NLPMESH_MODELS_FILE``, else the repository's ``deploy/models.toml``."""
    return Path(os.environ.get(MODELS_FILE_ENV) or DEFAULT_MODELS_FILE)


def load_catalogue(path: Path | None = None) -> Catalogue:
    path = path or models_file()
    try:
        text = path.read_text()
    except OSError as error:
        raise CatalogueError(f"cannot read the model catalogue {path}: {error.strerror or error}") from None
    return parse_catalogue(text, path)


def parse_catalogue(text: str, path: Path) -> Catalogue:
    """The catalogue in ``text``; relative paths in it are relative to ``path``'s folder."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise CatalogueError(f"{path}: not valid TOML: {error}") from None
    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise CatalogueError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; expected [models.<id>] tables")
    entries = document.get("models")
    if not isinstance(entries, dict) or not entries:
        raise CatalogueError(f"{path}: no models; add at least one [models.<id>] table")
    return Catalogue(path, tuple(_entry(_Where(path, model_id), body) for model_id, body in entries.items()))


@dataclass(frozen=True)
class _Where:
    """Where a value was read, for error messages: the file and the entry."""

    path: Path
    model_id: str

    def error(self, field: str, problem: str) -> CatalogueError:
        return CatalogueError(f"{self.path}: model {self.model_id!r}, field {field!r}: {problem}")

    def relative(self, value: str) -> Path:
        resolved = Path(value).expanduser()
        return resolved if resolved.is_absolute() else self.path.parent / resolved


def _entry(where: _Where, body: object) -> CatalogueModel:
    if not _ID.fullmatch(where.model_id):
        raise where.error("id", "an id is 1-64 lower-case letters, digits, '.', '_' or '-'")
    if not isinstance(body, dict):
        raise where.error("id", "must be a table ([models.<id>])")
    unknown = sorted(set(body) - _ENTRY_FIELDS)
    if unknown:
        raise where.error(unknown[0], f"unknown field; the fields are {', '.join(sorted(_ENTRY_FIELDS))}")
    if "source" not in body:
        raise where.error("source", "missing; say where the model's files come from (kind = pypi, gguf or hf)")
    name = body.get("name", where.model_id)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise where.error("name", "must be 1-128 letters, digits, '.', '_' or '-'")
    return CatalogueModel(
        id=where.model_id,
        name=name,
        source=_source(where, body["source"]),
        chat_template=_chat_template(where, body.get("chat_template", "model")),
        context_length=_context_length(where, body.get("context_length")),
        sampling=_sampling(where, body.get("sampling", {})),
        precisions=_precisions(where, body.get("precisions", list(PRECISIONS))),
    )


def _source(where: _Where, body: object) -> Source:
    if not isinstance(body, dict):
        raise where.error("source", "must be a table, e.g. { kind = \"gguf\", path = \"model.gguf\" }")
    kind = body.get("kind")
    fields = {"pypi": {"kind", "package", "file", "parts"}, "gguf": {"kind", "path"}, "hf": {"kind", "path"}}
    if kind not in fields:
        raise where.error("source.kind", f"{kind!r} is not a source kind; expected pypi, gguf or hf")
    unknown = sorted(set(body) - fields[kind])
    if unknown:
        raise where.error(f"source.{unknown[0]}", f"unknown field for a {kind} source; "
                                                  f"the fields are {', '.join(sorted(fields[kind]))}")
    for field in sorted(fields[kind] - {"kind", "parts"}):
        if not isinstance(body.get(field), str) or not body[field]:
            raise where.error(f"source.{field}", "missing, or not a non-empty string")
    if kind == "gguf":
        return GgufFileSource(where.relative(body["path"]))
    if kind == "hf":
        return HfFolderSource(where.relative(body["path"]))
    parts = body.get("parts", [])
    if not isinstance(parts, list) or not all(isinstance(part, str) and part for part in parts):
        raise where.error("source.parts", "must be a list of package names")
    return PypiSource(body["package"], body["file"], tuple(parts))


def _chat_template(where: _Where, value: object) -> Path | None:
    if not isinstance(value, str) or not value:
        raise where.error("chat_template", "must be \"model\" (the model's own) or a .jinja file's path")
    return None if value == "model" else where.relative(value)


def _context_length(where: _Where, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise where.error("context_length", "must be a positive whole number of tokens")
    return value


def _sampling(where: _Where, body: object) -> Sampling:
    if not isinstance(body, dict):
        raise where.error("sampling", "must be a table")
    unknown = sorted(set(body) - set(SAMPLING_FIELDS))
    if unknown:
        raise where.error(f"sampling.{unknown[0]}", f"unknown field; the fields are {', '.join(SAMPLING_FIELDS)}")
    values = dict(body)
    if "stop" in values:
        if not isinstance(values["stop"], list) or not all(isinstance(text, str) for text in values["stop"]):
            raise where.error("sampling.stop", "must be a list of strings")
        values["stop"] = tuple(values["stop"])
    for field in ("max_new_tokens", "top_k"):
        if field in values and (isinstance(values[field], bool) or not isinstance(values[field], int)):
            raise where.error(f"sampling.{field}", "must be a whole number")
    for field in ("temperature", "top_p"):
        if field in values and (isinstance(values[field], bool) or not isinstance(values[field], int | float)):
            raise where.error(f"sampling.{field}", "must be a number")
    sampling = Sampling(**values)
    violations = sampling.violations()
    if violations:
        raise where.error(violations[0].field, violations[0].description)
    return sampling


def _precisions(where: _Where, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise where.error("precisions", f"must be a non-empty list of {', '.join(PRECISIONS)}")
    unknown = [item for item in value if item not in PRECISIONS]
    if unknown:
        raise where.error("precisions", f"{unknown[0]!r} is not a precision; expected {', '.join(PRECISIONS)}")
    return tuple(value)
