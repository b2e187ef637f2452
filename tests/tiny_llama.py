"""A tiny randomly initialised Llama with the real SmolLM2 tokenizer, for fast inference tests.

Random weights produce arbitrary tokens, byte-level pieces of multi-byte
characters included, which is what the streaming-text tests want.
"""
from __future__ import annotations

import asyncio
import functools

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from meshkit.sampling import Sampling
from meshkit.settings import default_home
from modelfiles.convert import load_model_files
from services.inference.engine import Engine, EngineOptions
from services.inference.generation_types import GenerationRequest
from services.inference.prefix import PrefixCache

VOCAB_SIZE = 49152  # the real tokenizer's
EOS_ID = 2  # <|im_end|>


@functools.cache
def real_tokenizer():
    return AutoTokenizer.from_pretrained(load_model_files(default_home()).path)


def tiny_llama(context_length: int = 4096, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_engine(model: LlamaForCausalLM | None = None, prefix_cache: PrefixCache | None = None,
                **options) -> Engine:
    """A started engine on the tiny model; close it when done."""
    return Engine(
        model if model is not None else tiny_llama(),
        real_tokenizer(),
        EngineOptions(**options),
        model_name="tiny-llama",
        revision="test",
        prefix_cache=prefix_cache,
    )


def greedy_text(engine: Engine, ids: list[int], tenant: str = "acme", max_new_tokens: int = 12) -> str:
    """The engine's greedy continuation of ``ids`` (called outside any event loop)."""

    async def run():
        stream = engine.submit(GenerationRequest(ids, Sampling(max_new_tokens=max_new_tokens), tenant=tenant))
        items = [item async for item in stream]
        return "".join(item.text for item in items[:-1])

    return asyncio.run(run())
