"""Who is calling: a tenant and what it may use. The gateway learns it from the caller's API key."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TenantLimits:
    requests_per_s: float | None = None  # None = no limit
    tokens_per_min: int | None = None  # generated tokens
    max_streams: int | None = None  # requests in flight at once


@dataclass(frozen=True)
class Tenant:
    id: str
    limits: TenantLimits = field(default_factory=TenantLimits)
    prompt_cache: bool = True  # False: the tenant's requests neither read nor write the prompt cache
