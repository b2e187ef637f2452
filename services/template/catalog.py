"""The published templates: one TOML file per version, loaded once at start.

Layout: ``<templates_dir>/<id>/<version>.toml``. A version is immutable once
published; an empty version resolves to the highest by semantic-version order.
Any malformed file stops the service at start, naming the file: a template
silently missing in production is worse than a service that will not start.
A template's size is bounded here (``TemplateLimits``), and its render at
request time (``render.RenderLimits``). Template source only ever comes from
these files: no request field carries any.
"""
from __future__ import annotations

import tomllib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from packaging.version import InvalidVersion, Version

from meshkit.errors import InvalidArgument, NotFound
from meshkit.response_format import CHOICE, JSON_SCHEMA, REGEX, ResponseFormat
from services.template.prompt import ROLES, MessageTemplate, PromptTemplate, Variable
from services.template.render import sandbox_environment

_TEMPLATE_KEYS = {"id", "version", "description", "variables", "messages", "response_format"}
_RESPONSE_FORMAT_KEYS = {JSON_SCHEMA, REGEX, CHOICE}
_VARIABLE_KEYS = {"name", "required", "description", "max_chars"}
_MESSAGE_KEYS = {"role", "content"}


class TemplateFileError(ValueError):
    """A template file that cannot be published as it is."""


@dataclass(frozen=True)
class TemplateLimits:
    """How big a published template may be: its messages' source, and its variables' max_chars summed."""

    max_source_chars: int = 32_000
    max_variables_chars: int = 64_000


class TemplateCatalog:
    def __init__(self, templates: Iterable[PromptTemplate]):
        by_id: dict[str, list[PromptTemplate]] = defaultdict(list)
        for template in templates:
            by_id[template.id].append(template)
        for versions in by_id.values():
            versions.sort(key=lambda t: t.semver)
            _reject_equal_versions(versions)
        self._by_id = dict(sorted(by_id.items()))

    @classmethod
    def from_dir(cls, folder: Path, limits: TemplateLimits = TemplateLimits()) -> TemplateCatalog:
        if not folder.is_dir():
            raise TemplateFileError(f"{folder}: the templates folder does not exist")
        environment = sandbox_environment()
        stray = list(folder.glob("*.toml"))
        if stray:
            raise TemplateFileError(f"{stray[0]}: a template file belongs at <id>/<version>.toml")
        paths = sorted(folder.glob("*/*.toml"))
        if not paths:
            raise TemplateFileError(f"{folder}: no template files (<id>/<version>.toml)")
        return cls(load_template_file(path, environment, limits) for path in paths)

    def resolve(self, template_id: str, version: str = "") -> PromptTemplate:
        """The template ``id`` at ``version``; an empty version means the newest."""
        if not template_id:
            raise InvalidArgument.for_field("template.id", "a template id is required")
        versions = self._by_id.get(template_id)
        if versions is None:
            raise NotFound(f"no template {template_id!r}")
        if not version:
            return versions[-1]
        for template in versions:
            if template.version == version:
                return template
        raise NotFound(f"template {template_id!r} has no version {version!r}")

    def templates(self) -> list[PromptTemplate]:
        """Every version of every template, by id then version."""
        return [t for versions in self._by_id.values() for t in versions]

    def is_newest(self, template: PromptTemplate) -> bool:
        return self._by_id[template.id][-1] is template


def load_template_file(
    path: Path, environment: jinja2.Environment, limits: TemplateLimits = TemplateLimits()
) -> PromptTemplate:
    """One template version, checked and compiled; TemplateFileError names the file."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
        return _check_size(_template_from(data, path, environment), path, limits)
    except TemplateFileError:
        raise
    except (OSError, ValueError, jinja2.TemplateSyntaxError) as error:  # TOMLDecodeError is a ValueError
        raise TemplateFileError(f"{path}: {type(error).__name__}: {error}") from error


def _template_from(data: dict[str, Any], path: Path, environment: jinja2.Environment) -> PromptTemplate:
    _check_keys(data, _TEMPLATE_KEYS, "the template", path)
    template_id, version = _text(data, "id", path), _text(data, "version", path)
    if template_id != path.parent.name or version != path.stem:
        raise TemplateFileError(
            f"{path}: id {template_id!r} and version {version!r} must match the path <id>/<version>.toml"
        )
    try:
        Version(version)
    except InvalidVersion:
        raise TemplateFileError(f"{path}: version {version!r} is not a semantic version") from None
    variables = tuple(_variable_from(v, path) for v in data.get("variables", []))
    names = [v.name for v in variables]
    if len(set(names)) != len(names):
        raise TemplateFileError(f"{path}: a variable is declared twice in {names}")
    messages = tuple(_message_from(m, path, environment, set(names)) for m in data.get("messages", []))
    if not messages:
        raise TemplateFileError(f"{path}: a template needs at least one [[messages]] entry")
    return PromptTemplate(template_id, version, _text(data, "description", path), variables, messages,
                          _response_format_from(data.get("response_format"), path))


def _response_format_from(data: Any, path: Path) -> ResponseFormat | None:
    """A version's ``[response_format]``: exactly one of json_schema (JSON text), regex, or choice (a list of
    strings), checked as a request's would be, so that a format guided decoding cannot serve stops the start."""
    if data is None:
        return None
    _check_keys(data, _RESPONSE_FORMAT_KEYS, "[response_format]", path)
    if len(data) != 1:
        raise TemplateFileError(f"{path}: [response_format] takes exactly one of {sorted(_RESPONSE_FORMAT_KEYS)}")
    (kind, value), = data.items()
    if kind == CHOICE:
        if not isinstance(value, list) or not all(isinstance(choice, str) for choice in value):
            raise TemplateFileError(f"{path}: [response_format] choice must be a list of strings")
        value = tuple(value)
    elif not isinstance(value, str):
        raise TemplateFileError(f"{path}: [response_format] {kind} must be a string")
    response_format = ResponseFormat(kind, value)
    for violation in response_format.violations():
        raise TemplateFileError(f"{path}: [response_format] {kind}: {violation.description}")
    return response_format


def _check_size(template: PromptTemplate, path: Path, limits: TemplateLimits) -> PromptTemplate:
    source = sum(len(m.source) for m in template.messages)
    if source > limits.max_source_chars:
        raise TemplateFileError(
            f"{path}: the messages are {source} characters; at most {limits.max_source_chars} are allowed"
        )
    variables = sum(v.max_chars for v in template.variables)
    if variables > limits.max_variables_chars:
        raise TemplateFileError(
            f"{path}: the variables' max_chars add up to {variables}; at most {limits.max_variables_chars} are allowed"
        )
    return template


def _variable_from(data: dict[str, Any], path: Path) -> Variable:
    _check_keys(data, _VARIABLE_KEYS, "a variable", path)
    name = _text(data, "name", path)
    if not name.isidentifier():
        raise TemplateFileError(f"{path}: variable name {name!r} is not an identifier")
    required = data.get("required", False)
    max_chars = data.get("max_chars")
    if not isinstance(required, bool):
        raise TemplateFileError(f"{path}: variable {name!r}: required must be true or false")
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars <= 0:
        raise TemplateFileError(f"{path}: variable {name!r}: max_chars must be a positive integer")
    return Variable(name, required, _text(data, "description", path), max_chars)


def _message_from(
    data: dict[str, Any], path: Path, environment: jinja2.Environment, declared: set[str]
) -> MessageTemplate:
    _check_keys(data, _MESSAGE_KEYS, "a message", path)
    role, source = _text(data, "role", path), _text(data, "content", path)
    if role not in ROLES:
        raise TemplateFileError(f"{path}: message role {role!r} is not one of {', '.join(ROLES)}")
    # Every name a message uses must be declared, so StrictUndefined never fires at render.
    undeclared = meta.find_undeclared_variables(environment.parse(source)) - declared
    if undeclared:
        raise TemplateFileError(f"{path}: a {role} message uses undeclared variables {sorted(undeclared)}")
    return MessageTemplate(role, source, environment.from_string(source))


def _check_keys(data: Any, allowed: set[str], what: str, path: Path) -> None:
    if not isinstance(data, dict):
        raise TemplateFileError(f"{path}: {what} must be a table")
    unknown = set(data) - allowed
    if unknown:
        raise TemplateFileError(f"{path}: {what} has unknown keys {sorted(unknown)}")


def _text(data: dict[str, Any], key: str, path: Path) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise TemplateFileError(f"{path}: {key!r} must be a non-empty string")
    return value


def _reject_equal_versions(versions: list[PromptTemplate]) -> None:
    for older, newer in zip(versions, versions[1:]):
        if older.semver == newer.semver:
            raise TemplateFileError(
                f"template {older.id!r}: versions {older.version!r} and {newer.version!r} "
                "are the same version"
            )
