"""Tiny randomly initialised models of each family the engine runs, with the real SmolLM2 tokenizer.

Random weights produce arbitrary tokens, byte-level pieces of multi-byte
characters included, which is what the streaming-text tests want. Every family
gets the same small shapes (which int4's groups of 32 inputs and rows by 16
accept) and the parts that make it differ: Qwen2's q/k/v biases, Qwen3's
per-head norms, Gemma 3's norms and scaled embeddings; Gemma 3 and Qwen2 have a
sliding-window layer beside a full one, with a window short enough for the
tests' prompts to pass it.
"""
from __future__ import annotations

import asyncio
import functools

import torch
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from meshkit.sampling import Sampling
from meshkit.settings import default_home
from modelfiles.convert import load_model_files
from services.inference.engine import Engine, EngineOptions
from services.inference.families import family_of
from services.inference.generation_types import GenerationRequest
from services.inference.prefix import PrefixCache

VOCAB_SIZE = 49152  # the real tokenizer's
EOS_ID = 2  # <|im_end|>
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
SLIDING_WINDOW = 24  # Gemma 3's sliding layer: shorter than most test prompts

_SHAPES = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=EOS_ID,
               pad_token_id=EOS_ID)


def _llama(context_length: int) -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(**_SHAPES, max_position_embeddings=context_length))


def _qwen2(context_length: int) -> PreTrainedModel:
    # Qwen2 turns sliding-window layers on from max_window_layers on: the second layer here.
    return Qwen2ForCausalLM(Qwen2Config(**_SHAPES, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                                        max_window_layers=1, max_position_embeddings=context_length))


def _qwen3(context_length: int) -> PreTrainedModel:
    return Qwen3ForCausalLM(Qwen3Config(**_SHAPES, head_dim=32, max_position_embeddings=context_length))


def _gemma3(context_length: int) -> PreTrainedModel:
    config = Gemma3TextConfig(**_SHAPES, head_dim=32, query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW,
                              layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=context_length)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # Gemma initialises its norms to zero (a scale of 1): make each one count
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(0.0, 0.5)
    return model


_BUILDERS = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3": _gemma3}


def tiny_model(family: str = "llama", context_length: int = 4096, seed: int = 0) -> PreTrainedModel:
    """A tiny random model of ``family`` (one of ``FAMILIES``), in eval mode; the same weights for a seed."""
    torch.manual_seed(seed)
    return _BUILDERS[family](context_length).eval()


def tiny_llama(context_length: int = 4096, seed: int = 0) -> LlamaForCausalLM:
    return tiny_model("llama", context_length, seed)


@functools.cache
def real_tokenizer():
    return AutoTokenizer.from_pretrained(load_model_files(default_home()).path)


def tiny_engine(model: PreTrainedModel | None = None, prefix_cache: PrefixCache | None = None,
                **options) -> Engine:
    """A started engine on a tiny model (the Llama by default); close it when done."""
    model = model if model is not None else tiny_llama()
    return Engine(
        model,
        real_tokenizer(),
        EngineOptions(**options),
        model_name=f"tiny-{family_of(model.config).name}",
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
