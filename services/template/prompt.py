"""What a prompt template is, once loaded: declared variables and compiled messages."""
from __future__ import annotations

from dataclasses import dataclass

import jinja2
from packaging.version import Version

from meshkit.response_format import ResponseFormat

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Variable:
    name: str
    required: bool
    description: str
    max_chars: int


@dataclass(frozen=True)
class MessageTemplate:
    role: str
    source: str
    # Compiled once at load, in the catalog's sandboxed environment.
    compiled: jinja2.Template


@dataclass(frozen=True)
class PromptTemplate:
    id: str
    version: str
    description: str
    variables: tuple[Variable, ...]
    messages: tuple[MessageTemplate, ...]
    # The form this version's answers take (guided decoding), when the file declares one: a caller's own
    # response_format replaces it.
    response_format: ResponseFormat | None = None

    @property
    def semver(self) -> Version:
        return Version(self.version)

    @property
    def ref(self) -> str:
        """How logs and messages name this template: ``id@version``."""
        return f"{self.id}@{self.version}"

    def variable(self, name: str) -> Variable | None:
        return next((v for v in self.variables if v.name == name), None)
