"""Who is calling: a tenant and what it may use. The gateway learns it from the caller's API key."""
from __future__ import annotations

from dataclasses import dataclass, field

from meshkit.errors import PermissionDenied

KEY_SCOPE = "KEY_SCOPE"  # the ErrorInfo reason of a call outside its key's scope


@dataclass(frozen=True)
class TenantLimits:
    requests_per_s: float | None = None  # None = no limit
    tokens_per_min: int | None = None  # generated tokens
    max_streams: int | None = None  # requests in flight at once


@dataclass(frozen=True)
class KeyScope:
    """The templates and models a key may use; None = every one. A key limited to templates may not send a chat:
    it asks only what its templates ask."""

    templates: frozenset[str] | None = None
    models: frozenset[str] | None = None

    def check_template(self, template_id: str | None) -> None:
        """PermissionDenied (ErrorInfo reason KEY_SCOPE) when the key may not render ``template_id``
        (None: a chat)."""
        if self.templates is None or template_id in self.templates:
            return
        if template_id is None:
            raise PermissionDenied("this API key may only use templates, not a chat",
                                   reason=KEY_SCOPE, metadata={"template": ""})
        raise PermissionDenied(f"this API key may not use template {template_id!r}", reason=KEY_SCOPE,
                               metadata={"template": template_id})

    def check_model(self, model_id: str) -> None:
        if self.models is not None and model_id not in self.models:
            raise PermissionDenied(f"this API key may not use model {model_id!r}", reason=KEY_SCOPE,
                                   metadata={"model": model_id})

    def allows_template(self, template_id: str) -> bool:
        return self.templates is None or template_id in self.templates

    def allows_model(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


@dataclass(frozen=True)
class Tenant:
    id: str
    limits: TenantLimits = field(default_factory=TenantLimits)
    prompt_cache: bool = True  # False: the tenant's requests neither read nor write the prompt cache
    scope: KeyScope = field(default_factory=KeyScope)  # what the caller's key may use
