"""The template service's settings (env: NLPMESH_TEMPLATE_<FIELD>)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from meshkit.settings import ServiceSettings
from services.template.catalog import TemplateLimits
from services.template.render import DEFAULT_MAX_VARIABLES, RenderLimits

_RENDER = RenderLimits()
_TEMPLATE = TemplateLimits()


def shipped_templates_dir() -> Path:
    """The templates shipped with the deploy: <repo>/deploy/templates."""
    return Path(__file__).resolve().parents[2] / "deploy" / "templates"


class TemplateSettings(ServiceSettings, service="template"):
    templates_dir: Path = Field(default_factory=shipped_templates_dir)
    # A cap on how many variables one call may send, known or not.
    max_variables: int = Field(default=DEFAULT_MAX_VARIABLES, gt=0)
    # One render, all its messages together: past the time, RESOURCE_EXHAUSTED;
    # past the characters, INVALID_ARGUMENT on template.variables (render.py).
    render_timeout_ms: float = Field(default=_RENDER.timeout_ms, gt=0)
    max_render_chars: int = Field(default=_RENDER.max_chars, gt=0)
    # A template file over these does not load, and the service does not start.
    max_template_chars: int = Field(default=_TEMPLATE.max_source_chars, gt=0)
    max_template_variables_chars: int = Field(default=_TEMPLATE.max_variables_chars, gt=0)

    @property
    def render_limits(self) -> RenderLimits:
        return RenderLimits(timeout_ms=self.render_timeout_ms, max_chars=self.max_render_chars)

    @property
    def template_limits(self) -> TemplateLimits:
        return TemplateLimits(
            max_source_chars=self.max_template_chars, max_variables_chars=self.max_template_variables_chars
        )
