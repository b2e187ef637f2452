"""The template service's settings (env: NLPMESH_TEMPLATE_<FIELD>)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from meshkit.settings import ServiceSettings
from services.template.render import DEFAULT_MAX_VARIABLES


def shipped_templates_dir() -> Path:
    """The templates shipped with the deploy: <repo>/deploy/templates."""
    return Path(__file__).resolve().parents[2] / "deploy" / "templates"


class TemplateSettings(ServiceSettings, service="template"):
    templates_dir: Path = Field(default_factory=shipped_templates_dir)
    # A cap on how many variables one call may send, known or not.
    max_variables: int = Field(default=DEFAULT_MAX_VARIABLES, gt=0)
