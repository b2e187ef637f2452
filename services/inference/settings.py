"""The inference service's settings (env NLPMESH_INFERENCE_<FIELD>)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field

from meshkit.settings import ServiceSettings, default_home
from services.inference.engine import EngineOptions
from services.inference.precision import MAX_DECODE_ROWS

_ENGINE = EngineOptions()  # the engine's defaults, written once there


class InferenceSettings(ServiceSettings, service="inference"):
    home: Path = Field(default_factory=default_home)
    # The catalogue id of the model this process serves (deploy/models.toml); empty = the catalogue's
    # default, its first entry. One process serves one model: the gateway routes by model.
    model: str = ""
    # The engine's options (services/inference/engine.py EngineOptions), by the same names.
    threads: int = _ENGINE.threads  # torch intra-op threads for the model's one worker thread
    # Added to the process's nice value at start. The engine's step keeps the cores busy, while
    # every other hop (template, tokenizer, cache, gateway) is a millisecond of CPU on a budget of
    # tens: where they share cores, they go first. Raising it needs no privilege; 0 keeps it.
    niceness: int = Field(default=5, ge=0, le=19)
    max_queue: int = _ENGINE.max_queue  # requests waiting for a slot; beyond this, RESOURCE_EXHAUSTED
    max_running: int = Field(default=_ENGINE.max_running, ge=1, le=MAX_DECODE_ROWS)  # decoded together, one batch
    default_max_new_tokens: int = _ENGINE.default_max_new_tokens
    max_new_tokens_limit: int = _ENGINE.max_new_tokens_limit
    max_stop_sequences: int = _ENGINE.max_stop_sequences
    max_stop_chars: int = _ENGINE.max_stop_chars
    kv_shrink_idle_s: float = Field(default=_ENGINE.kv_shrink_idle_s, ge=0)  # EngineOptions: a long prompt's KV kept
    # Guided decoding (response_format): formats kept compiled, the least recently used dropped beyond this many.
    max_grammars: int = Field(default=_ENGINE.max_grammars, ge=1, le=4096)
    # Chunked prefill: a turn's token budget (vLLM's max_num_batched_tokens), one token per
    # decoding sequence and the rest for prompt tokens, in whole 32-token tiles, at least one
    # a turn; 0 prefills every prompt in one forward, stalling the running streams meanwhile.
    max_batched_tokens: int = Field(default=_ENGINE.max_batched_tokens, ge=0, le=65536)
    # With nothing decoding, the prompts in line are prefilled whole, packed into forwards of at most
    # this many prompt tokens (a first prompt longer than that goes alone, in one forward).
    max_prefill_batch_tokens: int = Field(default=_ENGINE.max_prefill_batch_tokens, ge=32, le=65536)
    # Beside decoding streams, a turn's prefill takes at most this many decode steps' time (a
    # chunk's layers spread over turns, one layer at least); 0: whole chunks, no time limit.
    prefill_share: float = Field(default=_ENGINE.prefill_share, ge=0, le=100)
    # Decode precision (services/inference/precision.py). auto (the default) takes the
    # fastest whose kernels keep greedy output batch-independent on this CPU, int4 first
    # (decode is bound by reading the weights, and int4 reads the fewest bytes), and logs
    # it; a test keeps each within 3% of float32's perplexity
    # (tests/integration/test_inference_precision.py). The engine refuses a precision named here
    # whose kernels cannot keep greedy output batch-independent on this CPU.
    dtype: Literal["auto", "int4", "int8", "bfloat16", "float32"] = "auto"
    # Where the model runs (services/inference/device.py): auto (CUDA where torch sees a
    # device, else the CPU), cpu, or cuda (refused at start without one). On CUDA the
    # model runs in bfloat16 with SDPA attention, whatever dtype says.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Prefix KV reuse (services/inference/prefix.py): blocks of this many prompt
    # tokens, kept in an in-process LRU of this many bytes (0 = off) and shared
    # with other replicas through Redis ("" = no Redis tier). Small blocks reuse all
    # but at most block - 1 shared tokens (16-token blocks left a 300-token prompt
    # with 270 shared a 44-token tail, two prefill tiles instead of one).
    prefix_block_tokens: int = Field(default=4, ge=1, le=1024)
    prefix_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("NLPMESH_INFERENCE_REDIS_URL", "REDIS_URL", "redis_url"),
    )
    # Redis keys of the prefix-KV tier start with this.
    key_prefix: str = "nlpmesh:kv"
    # A Redis read slower than this (per socket operation) is a miss; Redis is
    # then skipped for prefix_redis_cooldown_s.
    prefix_redis_budget_ms: float = Field(default=100.0, gt=0)
    prefix_redis_cooldown_s: float = Field(default=5.0, ge=0)
    prefix_redis_ttl_s: int = Field(default=3600, ge=1)
    # A block goes to Redis once seen this many times (2: prompts sent once
    # never fill Redis; 1: every block, as before). A sighting on another
    # replica is a marker key kept prefix_redis_seen_ttl_s.
    prefix_redis_min_sightings: int = Field(default=2, ge=1, le=2)
    prefix_redis_seen_ttl_s: int = Field(default=600, ge=1)

    def engine_options(self) -> EngineOptions:
        names = (option.name for option in dataclasses.fields(EngineOptions))
        return EngineOptions(**{name: getattr(self, name) for name in names})
