"""Validates a caller's variables against a template and renders its messages.

Templates run in Jinja's ImmutableSandboxedEnvironment: a template cannot
reach Python internals or mutate what it is given. A caller's value is only
ever data passed into the render, never compiled, so ``{{7*7}}`` in a value
comes out as those seven characters.

A render is bounded (``RenderLimits``): it runs through ``Template.generate()``
and checks the characters written and the time spent after every chunk. Jinja
cannot be interrupted inside a render, and a worker thread cannot be killed,
so checking between the chunks the render yields anyway is the one bound that
costs next to nothing on a normal render (docs/concepts.md, "Templates and render limits"). A loop that
writes nothing yields no chunk and is not checked: the sandbox caps each
``range()`` at 100,000 items and each variable has ``max_chars``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from meshkit.errors import FieldViolation, InvalidArgument, ResourceExhausted
from services.template.prompt import Message, PromptTemplate

# The public API path of a variable (docs/api.md: TemplateCall.variables).
FIELD_PREFIX = "template.variables"
DEFAULT_MAX_VARIABLES = 32
# A caller's unknown variable name is echoed back; keep the error detail small
# (it travels in trailing metadata, which has a size limit).
_SHOWN_NAME_CHARS = 64
_SHOWN_VIOLATIONS = 3

Value = str | int | float | bool


@dataclass(frozen=True)
class RenderLimits:
    """What one render may cost: wall time and characters written, all messages together."""

    timeout_ms: float = 200.0
    # Above a template's source limit plus its variables' (catalog.TemplateLimits),
    # so a template that only writes its text and its variables always fits.
    max_chars: int = 200_000


def sandbox_environment() -> ImmutableSandboxedEnvironment:
    """The environment every template is compiled in."""
    return ImmutableSandboxedEnvironment(
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_template(
    template: PromptTemplate,
    variables: Mapping[str, object],
    *,
    max_variables: int = DEFAULT_MAX_VARIABLES,
    limits: RenderLimits = RenderLimits(),
) -> list[Message]:
    """The template's chat messages with ``variables`` filled in.

    Raises InvalidArgument naming every bad variable at once, or naming
    ``template.variables`` when the rendered messages would exceed
    ``limits.max_chars``; ResourceExhausted when the render runs past
    ``limits.timeout_ms``. A template that breaks the sandbox raises
    jinja2's SecurityError: that is a bug in the template, not the caller's fault.
    """
    context = validate_variables(template, variables, max_variables=max_variables)
    budget = _RenderBudget(template, limits)
    return [Message(m.role, budget.render(m.compiled, context).strip()) for m in template.messages]


class _RenderBudget:
    """The characters and time a render has left, spent chunk by chunk across its messages."""

    def __init__(self, template: PromptTemplate, limits: RenderLimits):
        self._template, self._limits = template, limits
        self._chars_left = limits.max_chars
        self._deadline = time.perf_counter() + limits.timeout_ms / 1000

    def render(self, compiled: jinja2.Template, context: dict[str, Value]) -> str:
        parts = []
        for chunk in compiled.generate(context):
            parts.append(chunk)
            self._chars_left -= len(chunk)
            if self._chars_left < 0:
                raise InvalidArgument.for_field(
                    FIELD_PREFIX,
                    f"the rendered messages of {self._template.ref} exceed {self._limits.max_chars} characters",
                )
            if time.perf_counter() > self._deadline:
                raise ResourceExhausted(
                    f"rendering {self._template.ref} took longer than its {self._limits.timeout_ms:.0f} ms limit"
                )
        return "".join(parts)


def validate_variables(
    template: PromptTemplate, variables: Mapping[str, object], *, max_variables: int
) -> dict[str, Value]:
    """The render context: every declared variable, absent optional ones as ""."""
    if len(variables) > max_variables:
        raise InvalidArgument.for_field(
            FIELD_PREFIX, f"{len(variables)} variables given; at most {max_variables} are allowed"
        )
    context: dict[str, Value] = {}
    violations: list[FieldViolation] = []
    for name, raw in variables.items():
        declared = template.variable(name)
        if declared is None:
            problem = f"unknown variable {_shown(name)!r} for template {template.ref}"
            violations.append(_violation(name, problem))
            continue
        value, problem = _coerce(name, raw)
        if problem is None and len(str(value)) > declared.max_chars:
            problem = f"{name!r} is {len(str(value))} characters; the limit is {declared.max_chars}"
        if problem is not None:
            violations.append(_violation(name, problem))
        else:
            context[name] = value
    for declared in template.variables:
        if declared.name not in variables:
            if declared.required:
                violations.append(_violation(declared.name, f"missing required variable {declared.name!r}"))
            else:
                context[declared.name] = ""
    if violations:
        raise InvalidArgument(_summary(template, violations), violations)
    return context


def _coerce(name: str, raw: object) -> tuple[Value, str | None]:
    """A Struct value as the template sees it, or why it cannot be one."""
    if isinstance(raw, (str, bool)):
        return raw, None
    if isinstance(raw, (int, float)):
        if not math.isfinite(raw):
            return "", f"{name!r} must be a finite number"
        # Struct numbers are doubles: 3 arrives as 3.0 and should read "3".
        return (int(raw) if float(raw).is_integer() else raw), None
    kind = {type(None): "null", list: "a list", dict: "a struct"}.get(type(raw), type(raw).__name__)
    return "", f"{name!r} must be a string, number or boolean, not {kind}"


def _violation(name: str, description: str) -> FieldViolation:
    return FieldViolation(f"{FIELD_PREFIX}.{_shown(name)}", description)


def _shown(name: str) -> str:
    return name if len(name) <= _SHOWN_NAME_CHARS else name[:_SHOWN_NAME_CHARS] + "..."


def _summary(template: PromptTemplate, violations: list[FieldViolation]) -> str:
    shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:_SHOWN_VIOLATIONS])
    more = len(violations) - _SHOWN_VIOLATIONS
    suffix = f" (and {more} more)" if more > 0 else ""
    return f"invalid variables for template {template.ref}: {shown}{suffix}"
