"""The inference service's settings (env NLPMESH_INFERENCE_<FIELD>)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from meshkit.settings import ServiceSettings, default_home


class InferenceSettings(ServiceSettings, service="inference"):
    home: Path = Field(default_factory=default_home)
    threads: int = 2  # torch intra-op threads for the model's one worker thread
    max_queue: int = 64  # requests waiting for a slot; beyond this, RESOURCE_EXHAUSTED
    max_running: int = 8  # requests decoding at once (each holds its own KV cache)
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 2048
    max_stop_sequences: int = 4
    max_stop_chars: int = 64
    # Weights and KV cache precision. bfloat16 is the default because it is faster
    # here and its perplexity stays within 3% of float32 (tests/unit/test_inference_precision.py).
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
