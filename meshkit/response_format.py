"""The form an answer must take (guided decoding): a JSON Schema, a regular expression, or a list of choices.

One value type from the gateway's ``GenerateRequest.response_format`` to the engine, carried inside
``Sampling`` (the inference and cache protos hold it there), so the prompt-cache key and every hop see it.
Its limits are written here once, and ``violations`` also compiles it with llguidance (without a
tokenizer), so that a schema llguidance cannot serve is refused at the gateway, before any hop, naming
its field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import llguidance

from meshkit.errors import FieldViolation

JSON_SCHEMA, REGEX, CHOICE = "json_schema", "regex", "choice"
MAX_SCHEMA_BYTES = 16 * 1024
MAX_REGEX_BYTES = 1024
MAX_CHOICES = 64
MAX_CHOICE_CHARS = 256
# JSON between its tokens takes one space after each separator and no other whitespace: with flexible whitespace
# (llguidance's default) a model may spend its whole answer on newlines and indentation before the first key.
# An override, so a schema's own "x-guidance" options cannot turn it back on.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ResponseFormat:
    kind: str  # JSON_SCHEMA, REGEX or CHOICE
    value: str | tuple[str, ...]  # the schema's JSON text, the regex, or the choices

    @property
    def field(self) -> str:
        """The public API's name of the field that carries it."""
        return f"response_format.{self.kind}"

    def violations(self) -> list[FieldViolation]:
        """What is wrong with it: over a limit, not JSON, or a grammar llguidance refuses. A schema's
        reason is llguidance's first line (it names a keyword, e.g. "Invalid type: strin"); a regex's
        is not quoted back, as llguidance's message repeats the expression."""
        problem = self._size_problem()
        if problem is None:
            error = llguidance.LLMatcher.validate_grammar(self.grammar())
            if error and self.kind == JSON_SCHEMA:
                problem = f"not supported: {error.splitlines()[0][:120]}"
            elif error:
                problem = "not a regular expression guided decoding supports (Rust regex syntax)"
        return [FieldViolation(self.field, problem)] if problem else []

    def _size_problem(self) -> str | None:
        if self.kind == JSON_SCHEMA:
            if len(self.value.encode()) > MAX_SCHEMA_BYTES:
                return f"at most {MAX_SCHEMA_BYTES} bytes"
            try:
                schema = json.loads(self.value)
            except ValueError:
                return "must be a JSON Schema as JSON text"
            return None if isinstance(schema, dict | bool) else "must be a JSON object (a JSON Schema)"
        if self.kind == REGEX:
            if not self.value:
                return "must not be empty"
            return f"at most {MAX_REGEX_BYTES} bytes" if len(self.value.encode()) > MAX_REGEX_BYTES else None
        if not 1 <= len(self.value) <= MAX_CHOICES:
            return f"1 to {MAX_CHOICES} choices"
        if any(not 1 <= len(choice) <= MAX_CHOICE_CHARS for choice in self.value):
            return f"each choice is 1 to {MAX_CHOICE_CHARS} characters"
        return None

    def grammar(self) -> str:
        """llguidance's grammar for it (a choice list is a regex alternation of the escaped choices)."""
        if self.kind == JSON_SCHEMA:
            return llguidance.LLMatcher.grammar_from_json_schema(self.value, overrides=JSON_LAYOUT)
        if self.kind == REGEX:
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        return llguidance.LLMatcher.grammar_from_regex("|".join(_escaped(choice) for choice in self.value))

    def canonical(self) -> dict:
        """For the prompt-cache key: a schema's JSON re-serialised with sorted keys, so its spacing does not
        count; a regex and the choices (their order counts) as given."""
        if self.kind == JSON_SCHEMA:
            return {JSON_SCHEMA: json.dumps(json.loads(self.value), sort_keys=True, separators=(",", ":"))}
        return {self.kind: self.value if self.kind == REGEX else list(self.value)}

    @classmethod
    def from_pb(cls, pb) -> ResponseFormat | None:
        """From any of nlpmesh's ResponseFormat messages; None when none of its fields is set."""
        which = pb.WhichOneof("format")
        if which is None:
            return None
        value = tuple(pb.choice.choices) if which == CHOICE else getattr(pb, which)
        return cls(which, value)

    def to_pb(self, pb) -> None:
        """Sets the ResponseFormat message ``pb`` (a field of a request or a Sampling)."""
        if self.kind == CHOICE:
            pb.choice.choices.extend(self.value)
        else:
            setattr(pb, self.kind, self.value)


def _escaped(text: str) -> str:
    """``text`` as a regex that matches it literally (Rust's regex syntax escapes these)."""
    return "".join(f"\\{c}" if c in r"\.+*?()|[]{}^$#&-~" else c for c in text)
