"""The engine's decode step for Llama-family models: the model's own operations, without its wrappers.

A decode step is one row per sequence through 30 decoder layers. Through the
model's ``forward`` each layer also passes transformers' generic machinery:
keyword plumbing, deprecation and checkpointing wrappers, the attention and mask
interfaces, output objects. On a 2-core CPU that Python costs a fifth of the
step. ``DecodeStep`` calls the very same operations in the same order on the
same modules and weights (RMSNorm as ``LlamaRMSNorm`` computes it, the rotary
embedding from the model's own ``rotary_emb``, the KV write through
``SlotKV.update``, attention through transformers' SDPA function, each linear
layer through its decode kernel: ``DecodeLinear.decode_rows``), so its logits are
bit-identical to the model's forward (tests/unit/test_inference_decode_step.py),
and everything said about batch invariance holds unchanged. Prefill keeps the
model's own layers (services/inference/layered.py).

``decode_step_for`` gives one for a model of this layout (SmolLM2 is one) whose
linear layers are ``DecodeLinear`` (services/inference/precision.py); the engine
uses the model's forward for any other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from services.inference.attention import NAME as TILED_ATTENTION
from services.inference.precision import DecodeLinear


def rms_norm(hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm.forward``, operation for operation."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * hidden.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeStep:
    def __init__(self, model: nn.Module):
        self._base = model.base_model
        self._output = model.get_output_embeddings()
        self._layers = list(self._base.layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv) -> torch.Tensor:
        """The logits (B, 1, vocab) of one token per row: ``input_ids`` (B, 1), ``positions`` (B, 1) and
        ``mask`` (B, 1, 1, width) as ``SlotKV.decode`` made them for ``kv``."""
        base = self._base
        hidden = base.embed_tokens(input_ids)
        rows = hidden.shape[0]
        cos, sin = base.rotary_emb(hidden, position_ids=positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for index, layer in enumerate(self._layers):
            attention, mlp = layer.self_attn, layer.mlp
            x = rms_norm(hidden, layer.input_layernorm).view(rows, -1)
            shape = (rows, 1, -1, attention.head_dim)
            query = attention.q_proj.decode_rows(x).view(shape).transpose(1, 2)
            key = attention.k_proj.decode_rows(x).view(shape).transpose(1, 2)
            value = attention.v_proj.decode_rows(x).view(shape).transpose(1, 2)
            query = query * cos + _rotate_half(query) * sin
            key = key * cos + _rotate_half(key) * sin
            keys, values = kv.update(key, value, index)
            output, _ = sdpa_attention_forward(attention, query, keys, values, mask, dropout=0.0,
                                               scaling=attention.scaling)
            hidden = hidden + attention.o_proj.decode_rows(output.reshape(rows, -1)).view(rows, 1, -1)
            x = rms_norm(hidden, layer.post_attention_layernorm).view(rows, -1)
            up = F.silu(mlp.gate_proj.decode_rows(x)) * mlp.up_proj.decode_rows(x)
            hidden = hidden + mlp.down_proj.decode_rows(up).view(rows, 1, -1)
        return self._output.decode_rows(rms_norm(hidden, base.norm).view(rows, -1)).view(rows, 1, -1)


def decode_step_for(model: nn.Module) -> DecodeStep | None:
    """A ``DecodeStep`` for a Llama-family model whose linear layers are all ``DecodeLinear``; None otherwise."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama" or config.hidden_act != "silu":
        return None
    if getattr(config, "_attn_implementation", None) not in ("sdpa", TILED_ATTENTION):  # both decode through SDPA
        return None
    linears = [module for module in model.modules() if isinstance(module, nn.Linear | DecodeLinear)]
    if not linears or not all(isinstance(module, DecodeLinear) for module in linears):
        return None
    return DecodeStep(model)
