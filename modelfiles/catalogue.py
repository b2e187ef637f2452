"""The model catalogue (``deploy/models.toml``): which models this mesh may serve, and from where.

Read at start (``load_catalogue``), never at import; ``NLPMESH_MODELS_FILE`` names another file.
Every field is checked, and a key that is not one of them is refused rather than ignored, so a typo
cannot silently fall back to a default. Each error names the entry and the field. The file format is
documented in docs/models.md.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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
# An entry served by an external engine (engine = "openai"): no source of its own; the tokenizer and chat
# template of the built-in entry it names in ``tokenizer``, and the engine's endpoint.
_EXTERNAL_FIELDS = {"name", "engine", "tokenizer", "endpoint", "context_length", "sampling"}
ENGINE_KINDS = ("builtin", "openai")
# What an entry does: generate text (Generate; the default), or embed texts (Embed: services/embedding).
TASKS = ("generation", "embedding")
# An embedding entry: a sentence-transformers folder (a zip of one in a PyPI package, or a local folder), and
# the most tokens one text may have (default: the folder's sentence_bert_config.json max_seq_length).
_EMBEDDING_FIELDS = {"name", "task", "source", "max_tokens"}
# The sampling fields an OpenAI-compatible engine may honour (SAMPLING_FIELDS and seed); an endpoint's
# ``sampling_fields`` names those its engine does, and a request setting another is refused.
ENGINE_SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed", "presence_penalty",
                          "frequency_penalty")
_ENDPOINT_FIELDS = {"urls", "model", "token_file", "token_env", "ca_file", "prompt", "max_in_flight",
                    "sampling_fields", "response_format"}
# How an engine takes a request's response_format (guided decoding) on /v1/completions: "refuse" (the default:
# INVALID_ARGUMENT), vLLM's ``structured_outputs``, SGLang's ``json_schema``/``regex``, llama.cpp's server's
# ``json_schema`` (and a GBNF ``grammar`` for choices), or everything as a GBNF ``grammar``
# (llama-cpp-python's server, which takes nothing else).
RESPONSE_FORMAT_PASSING = ("refuse", "vllm", "sglang", "llama.cpp", "gbnf")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


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
class ExternalEngine:
    """An OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp's) that generates for a catalogue entry."""

    kind: str  # "openai": /v1/completions, streamed
    urls: tuple[str, ...]  # its replicas' base URLs (http or https), without /v1
    served_model: str  # the model's name on that server (the request's "model")
    token_file: Path | None = None  # a bearer token, read at start; never logged
    token_env: str | None = None  # or the variable holding it
    ca_file: Path | None = None  # the CA that signed its TLS certificate; None = the system's
    # "token_ids" sends the mesh's token ids (vLLM, SGLang, llama.cpp's C++ server); "text" sends them
    # decoded (servers that take only text, e.g. llama-cpp-python's): the engine tokenises again.
    prompt: str = "token_ids"
    max_in_flight: int = 64  # requests the adapter sends at once; beyond, RESOURCE_EXHAUSTED
    sampling_fields: tuple[str, ...] = ENGINE_SAMPLING_FIELDS  # what it honours; the rest is refused
    response_format: str = "refuse"  # RESPONSE_FORMAT_PASSING: how guided decoding reaches it, if at all

    def token(self) -> str | None:
        """The bearer token, or None; a named file or variable that is missing or empty is an error."""
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as error:
                raise CatalogueError(f"cannot read the engine token file {self.token_file}: "
                                     f"{error.strerror or error}") from None
        elif self.token_env is not None:
            token = os.environ.get(self.token_env, "").strip()
        else:
            return None
        if not token:
            raise CatalogueError(f"the engine token ({self.token_file or '$' + str(self.token_env)}) is empty")
        return token


@dataclass(frozen=True)
class CatalogueModel:
    id: str  # what callers put in `model`
    name: str  # the name the model reports (ModelInfo.model); the id unless the entry says otherwise
    source: Source
    chat_template: Path | None  # a Jinja file overriding the model's own; None = the model's own
    context_length: int | None  # None = the model's own
    sampling: Sampling  # the defaults a request's unset fields take
    precisions: tuple[str, ...]  # the CPU precisions the engine may run it in
    engine: str = "builtin"  # ENGINE_KINDS
    external: ExternalEngine | None = None  # where it runs, for an external engine
    tokenizer: str = ""  # an external entry's built-in entry whose tokenizer and template it uses
    task: str = "generation"  # TASKS
    max_tokens: int | None = None  # an embedding entry's limit per text; None = the model folder's own

    @property
    def files_id(self) -> str:
        """The catalogue id whose converted files hold this model's tokenizer and chat template."""
        return self.tokenizer or self.id


@dataclass(frozen=True)
class Catalogue:
    path: Path
    models: tuple[CatalogueModel, ...]

    @property
    def ids(self) -> tuple[str, ...]:
        """The generative models' ids, the default first (what Generate serves)."""
        return tuple(model.id for model in self.models if model.task == "generation")

    @property
    def embedding_ids(self) -> tuple[str, ...]:
        return tuple(model.id for model in self.models if model.task == "embedding")

    def get(self, model_id: str) -> CatalogueModel:
        for model in self.models:
            if model.id == model_id:
                return model
        every = ", ".join(model.id for model in self.models)
        raise CatalogueError(f"{self.path}: no model {model_id!r}; the catalogue has {every}")


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
    models = tuple(_entry(_Where(path, model_id), body) for model_id, body in entries.items())
    if models[0].task != "generation":
        raise _Where(path, models[0].id).error("task", "the first entry is the default model and must generate; "
                                                       "list embedding models after it")
    return Catalogue(path, tuple(_resolved_tokenizer(_Where(path, model.id), model, models) for model in models))


def _resolved_tokenizer(where: _Where, model: CatalogueModel, models: tuple[CatalogueModel, ...]) -> CatalogueModel:
    """An external entry with its tokenizer entry's source (where its tokenizer comes from)."""
    if model.external is None:
        return model
    shared = next((other for other in models if other.id == model.tokenizer), None)
    if shared is None or shared.external is not None:
        builtin = ", ".join(other.id for other in models if other.external is None) or "none"
        raise where.error("tokenizer", f"{model.tokenizer!r} is not a built-in entry of this catalogue "
                                       f"(built-in: {builtin})")
    return dataclasses.replace(model, source=shared.source, chat_template=shared.chat_template,
                               context_length=model.context_length or shared.context_length)


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
    engine = body.get("engine", "builtin")
    if engine not in ENGINE_KINDS:
        raise where.error("engine", f"{engine!r} is not an engine kind; expected {', '.join(ENGINE_KINDS)}")
    task = body.get("task", "generation")
    if task not in TASKS:
        raise where.error("task", f"{task!r} is not a task; expected {', '.join(TASKS)}")
    if task == "embedding":
        return _embedding_entry(where, body)
    if engine != "builtin":
        return _external_entry(where, body)
    unknown = sorted(set(body) - _ENTRY_FIELDS - {"engine", "task"})
    if unknown:
        raise where.error(unknown[0], f"unknown field; the fields are {', '.join(sorted(_ENTRY_FIELDS))}")
    if "source" not in body:
        raise where.error("source", "missing; say where the model's files come from (kind = pypi, gguf or hf)")
    return CatalogueModel(
        id=where.model_id,
        name=_name(where, body),
        source=_source(where, body["source"]),
        chat_template=_chat_template(where, body.get("chat_template", "model")),
        context_length=_context_length(where, body.get("context_length")),
        sampling=_sampling(where, body.get("sampling", {})),
        precisions=_precisions(where, body.get("precisions", list(PRECISIONS))),
    )


def _embedding_entry(where: _Where, body: dict) -> CatalogueModel:
    unknown = sorted(set(body) - _EMBEDDING_FIELDS)
    if unknown:
        raise where.error(unknown[0], f"unknown field for an embedding entry; the fields are "
                                      f"{', '.join(sorted(_EMBEDDING_FIELDS))}")
    if "source" not in body:
        raise where.error("source", "missing; say where the model's files come from (kind = pypi or hf)")
    source = _source(where, body["source"])
    if isinstance(source, GgufFileSource) or (isinstance(source, PypiSource) and source.parts):
        raise where.error("source", "an embedding model is a sentence-transformers folder: a local one "
                                    "(kind = \"hf\") or a zip of one in a package (kind = \"pypi\")")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= 8192):
        raise where.error("max_tokens", "must be a whole number of tokens in [1, 8192]")
    return CatalogueModel(id=where.model_id, name=_name(where, body), source=source, chat_template=None,
                          context_length=None, sampling=Sampling(), precisions=(), task="embedding",
                          max_tokens=max_tokens)


def _name(where: _Where, body: dict) -> str:
    name = body.get("name", where.model_id)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise where.error("name", "must be 1-128 letters, digits, '.', '_' or '-'")
    return name


def _external_entry(where: _Where, body: dict) -> CatalogueModel:
    unknown = sorted(set(body) - _EXTERNAL_FIELDS)
    if unknown:
        raise where.error(unknown[0], f"unknown field for an external engine's entry; the fields are "
                                      f"{', '.join(sorted(_EXTERNAL_FIELDS))}")
    tokenizer = body.get("tokenizer")
    if not isinstance(tokenizer, str) or not _ID.fullmatch(tokenizer):
        raise where.error("tokenizer", "missing; name the built-in entry whose tokenizer and chat template "
                                       "the engine's model uses")
    if "endpoint" not in body:
        raise where.error("endpoint", "missing; say where the engine is ([models.<id>.endpoint] urls, model)")
    return CatalogueModel(
        id=where.model_id,
        name=_name(where, body),
        source=PypiSource("", ""),  # replaced by the tokenizer entry's (_resolved_tokenizer)
        chat_template=None,
        context_length=_context_length(where, body.get("context_length")),
        sampling=_sampling(where, body.get("sampling", {})),
        precisions=(),
        engine=body["engine"],
        external=_endpoint(where, body["engine"], body["endpoint"]),
        tokenizer=tokenizer,
    )


def _endpoint(where: _Where, kind: str, body: object) -> ExternalEngine:
    if not isinstance(body, dict):
        raise where.error("endpoint", "must be a table: urls, model, and optionally token_file or token_env, "
                                      "ca_file, prompt, max_in_flight, sampling_fields, response_format")
    unknown = sorted(set(body) - _ENDPOINT_FIELDS)
    if unknown:
        fields = ", ".join(sorted(_ENDPOINT_FIELDS))
        raise where.error(f"endpoint.{unknown[0]}", f"unknown field; the fields are {fields}")
    urls = body.get("urls")
    if not isinstance(urls, list) or not urls or len(urls) > 64:
        raise where.error("endpoint.urls", "must be a list of 1-64 base URLs (http://host:port)")
    for url in urls:
        problem = _url_problem(url)
        if problem:
            raise where.error("endpoint.urls", problem)
    if len(set(urls)) != len(urls):
        raise where.error("endpoint.urls", "a URL is listed twice")
    served = body.get("model")
    if not isinstance(served, str) or not served or len(served) > 256 or not served.isprintable():
        raise where.error("endpoint.model", "missing; the model's name on the engine (its /v1/models id)")
    if "token_file" in body and "token_env" in body:
        raise where.error("endpoint.token_env", "give the token in token_file or token_env, not both")
    token_env = body.get("token_env")
    if token_env is not None and (not isinstance(token_env, str) or not _ENV_NAME.fullmatch(token_env)):
        raise where.error("endpoint.token_env", "must be an environment variable's name")
    prompt = body.get("prompt", "token_ids")
    if prompt not in ("token_ids", "text"):
        raise where.error("endpoint.prompt", f"{prompt!r}: expected \"token_ids\" or \"text\"")
    in_flight = body.get("max_in_flight", 64)
    if isinstance(in_flight, bool) or not isinstance(in_flight, int) or not 1 <= in_flight <= 100_000:
        raise where.error("endpoint.max_in_flight", "must be a whole number in [1, 100000]")
    passing = body.get("response_format", "refuse")
    if passing not in RESPONSE_FORMAT_PASSING:
        raise where.error("endpoint.response_format",
                          f"{passing!r}: expected one of {', '.join(RESPONSE_FORMAT_PASSING)}")
    fields = body.get("sampling_fields", list(ENGINE_SAMPLING_FIELDS))
    if not isinstance(fields, list) or any(field not in ENGINE_SAMPLING_FIELDS for field in fields):
        raise where.error("endpoint.sampling_fields", f"must be a list of {', '.join(ENGINE_SAMPLING_FIELDS)}")
    return ExternalEngine(
        kind=kind, urls=tuple(url.rstrip("/") for url in urls), served_model=served,
        token_file=_optional_path(where, body, "token_file"), token_env=token_env,
        ca_file=_optional_path(where, body, "ca_file"), prompt=prompt, max_in_flight=in_flight,
        sampling_fields=tuple(fields), response_format=passing,
    )


def _url_problem(url: object) -> str | None:
    if not isinstance(url, str):
        return "each URL must be a string"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http:// or https:// URL"
    if parts.username or parts.password:
        return "a URL must not hold credentials; use token_file or token_env"
    if parts.query or parts.fragment:
        return f"{url!r}: a base URL has no query or fragment"
    if parts.path.rstrip("/").endswith("/v1"):
        return f"{url!r}: give the base URL, without /v1"
    return None


def _optional_path(where: _Where, body: dict, field: str) -> Path | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise where.error(f"endpoint.{field}", "must be a file's path")
    return where.relative(value)


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
