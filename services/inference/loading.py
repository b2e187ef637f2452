"""Loads the model into an engine and warms it up (called off the event loop)."""
from __future__ import annotations

import asyncio
import logging
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from meshkit.cpu_features import read_cpu_features
from meshkit.sampling import Sampling
from meshkit.server import StartRefused
from modelfiles.architectures import UnsupportedArchitecture, check_engine_supports
from modelfiles.catalogue import CatalogueError, CatalogueModel, load_catalogue
from modelfiles.convert import ModelFiles, ModelNotConverted, default_model_id, load_model_files
from services.inference.device import describe, resolve_device
from services.inference.engine import Engine
from services.inference.generation_types import GenerationRequest
from services.inference.precision import FASTEST_FIRST, apply_fastest_precision, apply_precision
from services.inference.prefix import PrefixCache, RedisBlocks
from services.inference.settings import InferenceSettings

log = logging.getLogger("nlpmesh.inference")


def load_model(files: ModelFiles, dtype: str = "float32", device: torch.device | str = "cpu",
               allowed: tuple[str, ...] = FASTEST_FIRST) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (eval mode) and its tokenizer from a converted folder.

    On the CPU ``dtype`` is auto, int4, int8, bfloat16 or float32 (services/inference/precision.py;
    auto: the fastest of ``allowed``, the catalogue entry's precisions, whose kernels keep rows
    independent on this CPU); on CUDA the model runs in bfloat16 with SDPA attention
    (services/inference/device.py).
    """
    device = torch.device(device)
    log.info("loading the tokenizer of %s (revision %s) from %s", files.name, files.revision, files.path)
    tokenizer = AutoTokenizer.from_pretrained(files.path)
    # Its progress bar would be the one line of the service's log that is not a log record.
    hf_logging.disable_progress_bar()
    if device.type == "cuda":
        log.info("loading the weights in bfloat16 on %s (the dtype setting, %s, is for the CPU)", device, dtype)
        model = AutoModelForCausalLM.from_pretrained(files.path, dtype=torch.bfloat16, attn_implementation="sdpa")
        return model.to(device).eval(), tokenizer
    log.info("loading the weights in %s", dtype)

    def weights() -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(files.path, dtype=torch.float32)

    if dtype == "auto":
        return apply_fastest_precision(weights, read_cpu_features(), allowed).eval(), tokenizer
    return apply_precision(weights(), dtype).eval(), tokenizer


def load_engine(settings: InferenceSettings) -> Engine:
    """The real model in a started engine. Blocking: run it in a thread. ``StartRefused`` (one line, no
    traceback) for a model the catalogue lacks, that is not converted, that the engine does not run, or a
    precision its catalogue entry excludes."""
    started = time.monotonic()
    try:
        entry = load_catalogue().get(settings.model or default_model_id())
        files = load_model_files(settings.home, entry.id)
        check_engine_supports(files.model_id, files.architecture)
        check_precision(entry, settings.dtype)
    except (CatalogueError, ModelNotConverted, UnsupportedArchitecture) as error:
        raise StartRefused(str(error)) from None
    device = resolve_device(settings.device)
    log.info("inference device: %s (NLPMESH_INFERENCE_DEVICE=%s)", describe(device), settings.device)
    try:
        model, tokenizer = load_model(files, settings.dtype, device, allowed=entry.precisions)
    except UnsupportedArchitecture as error:  # what the model's config says, read with its weights
        raise StartRefused(f"model {entry.id}: {error}") from None
    log.info("model loaded in %.1f s; starting the engine", time.monotonic() - started)
    options = settings.engine_options()
    # The engine names the model by its catalogue id: what the gateway routes by and callers see.
    return Engine(model, tokenizer, options, model_name=files.model_id, revision=files.revision,
                  prefix_cache=prefix_cache(settings, files))


def check_precision(entry: CatalogueModel, dtype: str) -> None:
    """Refuses a precision the model's catalogue entry does not allow (``auto`` picks among those it does)."""
    if dtype != "auto" and dtype not in entry.precisions:
        raise UnsupportedArchitecture(f"model {entry.id}: NLPMESH_INFERENCE_DTYPE={dtype} is not among its "
                                      f"catalogue precisions ({', '.join(entry.precisions)})")


def prefix_cache(settings: InferenceSettings, files: ModelFiles) -> PrefixCache | None:
    """The two-tier prefix KV cache the settings ask for; None when it is off."""
    if settings.prefix_cache_bytes == 0:
        log.info("prefix KV reuse is off")
        return None
    shared = None
    if settings.redis_url:
        shared = RedisBlocks(
            settings.redis_url,
            key_prefix=settings.key_prefix,
            budget_s=settings.prefix_redis_budget_ms / 1000,
            ttl_s=settings.prefix_redis_ttl_s,
            cooldown_s=settings.prefix_redis_cooldown_s,
            seen_ttl_s=settings.prefix_redis_seen_ttl_s,
        )
    log.info("prefix KV reuse: %d-token blocks, %d MiB in process, %s", settings.prefix_block_tokens,
             settings.prefix_cache_bytes // 2**20,
             f"shared through Redis once seen {settings.prefix_redis_min_sightings} time(s)" if shared
             else "no Redis tier")
    return PrefixCache(
        model=files.model_id,  # with the revision: two models (or revisions) never share a KV block
        revision=files.revision,
        block_tokens=settings.prefix_block_tokens,
        local_bytes=settings.prefix_cache_bytes,
        shared=shared,
        redis_min_sightings=settings.prefix_redis_min_sightings,
    )


async def warm_up_engine(engine: Engine) -> None:
    """One tiny generation, so the first real request does not pay for lazy setup."""
    started = time.monotonic()
    prompt = engine.tokenizer.encode("Hello")
    stream = engine.submit(GenerationRequest(prompt, Sampling(max_new_tokens=2), "warm-up"))
    async with stream:
        async for _ in stream:
            pass
    engine.forget_costs()  # measured cold: the first real prefills measure them afresh
    await asyncio.to_thread(engine.prepare_guided)  # no constrained request waits for it
    log.info("warm-up generation took %.2f s", time.monotonic() - started)
