"""The adapter's settings: the inference service's variables (NLPMESH_INFERENCE_<FIELD>), as it takes its place."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from meshkit.settings import ServiceSettings, default_home


class AdapterSettings(ServiceSettings, service="inference"):
    home: Path = Field(default_factory=default_home)
    # The catalogue id served: an entry with engine = "openai" (deploy/models.toml); empty = the first.
    model: str = ""
    default_max_new_tokens: int = Field(default=256, ge=1)
    max_new_tokens_limit: int = Field(default=2048, ge=1)
    max_stop_sequences: int = Field(default=4, ge=0)
    max_stop_chars: int = Field(default=64, ge=1)
    # Opening a connection to the engine; past it the replica is skipped for replica_down_s. Also how long
    # a request waits for one of the max_connections before RESOURCE_EXHAUSTED.
    connect_timeout_s: float = Field(default=5.0, gt=0)
    replica_down_s: float = Field(default=5.0, ge=0)
    # The engine sending nothing this long (no token, no end): DEADLINE_EXCEEDED naming the engine hop.
    read_timeout_s: float = Field(default=60.0, gt=0)
    # Requests to the engine at once, each on a kept-alive connection of its one pool (for all its replicas).
    max_connections: int = Field(default=256, ge=1)
    # How often the engine's /metrics is read for its load (vLLM's num_requests_running/waiting); 0 = never.
    load_poll_s: float = Field(default=1.0, ge=0)
    # RetryInfo on a refusal when the engine gave no Retry-After (and when max_in_flight is reached).
    retry_after_s: float = Field(default=1.0, gt=0)
