"""The embedding service's settings (env: NLPMESH_EMBEDDING_<FIELD>)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from meshkit.settings import ServiceSettings, default_home


class EmbeddingSettings(ServiceSettings, service="embedding"):
    home: Path = Field(default_factory=default_home)
    # The catalogue id served (an entry with task = "embedding"); empty = the catalogue's first such entry.
    model: str = ""
    # The most texts one forward takes: concurrent requests share a forward up to it.
    max_batch_texts: int = Field(default=32, ge=1, le=1024)
    # Texts waiting for a forward; past it a request is refused RESOURCE_EXHAUSTED with RetryInfo.
    max_queued_texts: int = Field(default=2048, ge=1)
    # The most texts one request may carry (the gateway holds callers to the same number).
    max_texts: int = Field(default=256, ge=1)
    # torch's threads for the forward; 0 = one per core this process may use.
    threads: int = Field(default=0, ge=0)
    # The weights' precision: float32, bfloat16, or auto (bfloat16 where the CPU has AMX-BF16 or AVX-512 BF16,
    # float32 elsewhere); the start's log line says which.
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
