"""The cache service's settings (env NLPMESH_CACHE_<FIELD>, or [cache] in the config file)."""
from __future__ import annotations

from pydantic import AliasChoices, Field

from meshkit.settings import ServiceSettings


class CacheSettings(ServiceSettings, service="cache"):
    # REDIS_URL is the name the rest of the world uses; ours wins when both are set
    # (choices are tried in order; the last one is the field's own name, for
    # keyword arguments and the config file). Not in repr: it may hold a password.
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("NLPMESH_CACHE_REDIS_URL", "REDIS_URL", "redis_url"),
        repr=False,
    )
    key_prefix: str = "nlpmesh:pc"
    ttl_s: int = Field(default=3600, gt=0)
    # The hot path's whole allowance for one Redis round trip: slower is a miss.
    timeout_s: float = Field(default=0.05, gt=0)
    max_answer_bytes: int = Field(default=256 * 1024, gt=0)
