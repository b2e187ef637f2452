"""The engine's decode step for Llama-family models: the model's own operations, without its wrappers.

A decode step is one row per sequence through every decoder layer. Through the
model's ``forward`` each layer also passes transformers' generic machinery:
keyword plumbing, deprecation and checkpointing wrappers, the attention and mask
interfaces, output objects. With a model this small on a CPU, that Python is a
good part of the step (bench/engine_speed.py measures the step). ``DecodeStep``
calls the very same operations in the same order on the same modules and weights
(RMSNorm as ``LlamaRMSNorm`` computes it, the rotary embedding from the model's
own ``rotary_emb``, the KV write through ``SlotKV.update``, attention through
transformers' SDPA function, each linear layer through its decode kernel:
``DecodeLinear.decode_rows``), so its logits are bit-identical to the model's
forward (tests/integration/test_inference_decode_step.py), and everything said about
batch invariance holds unchanged. Where the precision's kernel gives the same
bits for outputs side by side (checked at start), q, k and v are one kernel call
and gate and up another (``JoinedLayer``, through ``JoinedLinear``,
services/inference/joined_linear.py). Prefill chunks run their decoder layers
through the same ``decoder_layer`` (services/inference/layered.py), with the
layers' tiled GEMM and the tiled attention, bit-identical to the layers' own
forward.

``decode_step_for`` gives one for a model of this layout (SmolLM2 is one) whose
linear layers are ``DecodeLinear`` (services/inference/decode_linear.py); the engine
uses the model's forward for any other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from services.inference.attention import NAME as TILED_ATTENTION
from services.inference.decode_linear import DecodeLinear
from services.inference.joined_linear import JoinedLinear
from services.inference.kernel_plan import KernelPlan, kernel_plan


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


def decoder_layer(layer: nn.Module, index: int, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                  mask: torch.Tensor, kv, plan: KernelPlan, *, decode: bool, outputs: int | None = None
                  ) -> torch.Tensor:
    """One ``LlamaDecoderLayer`` as its forward computes it, without its wrappers: ``hidden``
    (B, n, hidden), ``rotary`` the model's (cos, sin) already unsqueezed to (B, 1, n, head_dim).
    A decode step (``decode``) takes each linear layer's decode kernel and transformers' SDPA
    function; a prefill chunk (under ``plan.prefill``, ``plan`` the model's) the layers' own forward
    (tiled GEMM) and the model's attention interface (the tiled attention).

    ``outputs`` (prefill only): the layer's keys and values are written for every row, but its output
    is computed for the last ``outputs`` rows only (None: all), each row placed in its tile as the
    placement places a prefill from it (``KernelPlan.rows_skipped``; where rows go from each prefill's
    start, a row's bits are checked not to depend on its place), so with the same bits; with 0 the
    input comes back unchanged.
    The model's last layer needs only the prompt's last row, for the logits, and nothing in a chunk
    before the prompt's last."""
    attention, mlp = layer.self_attn, layer.mlp
    rows = hidden.shape[:-1]
    project = _decode_rows if decode else _prefill_rows
    attend = sdpa_attention_forward if decode else ALL_ATTENTION_FUNCTIONS[attention.config._attn_implementation]
    cos, sin = rotary
    head_dim = attention.head_dim
    x = rms_norm(hidden, layer.input_layernorm)
    key = _heads(project(attention.k_proj, x), head_dim)
    value = _heads(project(attention.v_proj, x), head_dim)
    key = key * cos + _rotate_half(key) * sin
    keys, values = kv.update(key, value, index)
    skip = 0 if decode or outputs is None else max(rows[-1] - outputs, 0)
    if skip == rows[-1]:
        return hidden
    with plan.rows_skipped(skip):
        if skip:
            x, hidden, mask = x[:, skip:], hidden[:, skip:], mask[..., skip:, :]
            cos, sin = cos[..., skip:, :], sin[..., skip:, :]
        query = _heads(project(attention.q_proj, x), head_dim)
        query = query * cos + _rotate_half(query) * sin
        output, _ = attend(attention, query, keys, values, mask, dropout=0.0, scaling=attention.scaling)
        hidden = hidden + project(attention.o_proj, output.reshape(*hidden.shape[:-1], -1).contiguous())
        x = rms_norm(hidden, layer.post_attention_layernorm)
        return hidden + project(mlp.down_proj, F.silu(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))


def _heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, n, heads * head_dim) -> (B, heads, n, head_dim)."""
    return projected.view(*projected.shape[:-1], -1, head_dim).transpose(1, 2)


def _decode_rows(linear: DecodeLinear, x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in) through the linear layer's decode kernel."""
    return linear.decode_rows(x.view(-1, linear.in_features)).view(*x.shape[:-1], -1)


def _prefill_rows(linear: DecodeLinear, x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in) through the linear layer's forward: the tiled GEMM in a prefill."""
    return linear(x)


def unsqueezed(rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rotary
    return cos.unsqueeze(1), sin.unsqueeze(1)


class JoinedLayer:
    """One decoder layer's decode step with q, k and v in one kernel call and gate and up in another
    (``JoinedLinear``), and the rotary embedding of the queries and keys in one go:
    ``rotate_half(x) * sin`` is ``roll(x, half) * sin`` with the sine's first half negated, since
    ``(-a) * b`` and ``a * (-b)`` are the same number. The same operations on the same values as
    ``decoder_layer``, so the same bits, in fewer calls."""

    __slots__ = ("down", "gate_up", "groups", "head_dim", "heads", "index", "input_norm", "intermediate", "kv_heads",
                 "o_proj", "post_norm", "qkv", "scaling")

    def __init__(self, layer: nn.Module, index: int, qkv: JoinedLinear, gate_up: JoinedLinear):
        attention = layer.self_attn
        self.index, self.qkv, self.gate_up = index, qkv, gate_up
        self.o_proj, self.down = attention.o_proj, layer.mlp.down_proj
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.heads = attention.q_proj.out_features // self.head_dim
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self.groups = self.heads // self.kv_heads
        self.intermediate = layer.mlp.gate_proj.out_features

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, mask: torch.Tensor,
                kv) -> torch.Tensor:
        """``hidden`` (B, 1, hidden); ``cos`` and ``signed_sin`` (B, 1, 1, head_dim)."""
        rows, heads, kv_heads, head_dim = hidden.shape[0], self.heads, self.kv_heads, self.head_dim
        x = rms_norm(hidden, self.input_norm).view(rows, -1)
        qkv = self.qkv.decode_rows(x).view(rows, 1, -1, head_dim)  # (B, 1, heads + 2 kv_heads, head_dim)
        rotating = qkv[:, :, : heads + kv_heads]
        rotated = rotating * cos + torch.roll(rotating, head_dim // 2, -1) * signed_sin
        query = rotated[:, :, :heads].transpose(1, 2)
        key = rotated[:, :, heads:].transpose(1, 2)
        value = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        keys, values = kv.update(key, value, self.index)
        if self.groups > 1:  # transformers' pack_gqa for one query token: the query heads by their KV head
            query = query.reshape(rows, kv_heads, self.groups, head_dim)
        output = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=0.0,
                                                scale=self.scaling, is_causal=False)
        output = output.reshape(rows, -1, 1, head_dim).transpose(1, 2).contiguous().view(rows, -1)
        hidden = hidden + self.o_proj.decode_rows(output).view(rows, 1, -1)
        gate_up = self.gate_up.decode_rows(rms_norm(hidden, self.post_norm).view(rows, -1))
        intermediate = self.intermediate
        activated = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        return hidden + self.down.decode_rows(activated).view(rows, 1, -1)


def joined_layers(layers: list[nn.Module]) -> list[JoinedLayer] | None:
    """A ``JoinedLayer`` for every layer, or None where the precision's kernels cannot join them bit for bit."""
    joined = []
    for index, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        qkv = JoinedLinear.join([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up = JoinedLinear.join([mlp.gate_proj, mlp.up_proj])
        if qkv is None or gate_up is None:
            return None
        joined.append(JoinedLayer(layer, index, qkv, gate_up))
    return joined


class DecodeStep:
    def __init__(self, model: nn.Module):
        self._base = model.base_model
        self._output = model.get_output_embeddings()
        self._layers = list(self._base.layers)
        self._plan = kernel_plan(model)
        self._joined = joined_layers(self._layers)

    @property
    def description(self) -> str:
        if self._joined is None:
            return "the model's operations without transformers' wrappers (DecodeStep)"
        return "the model's operations without transformers' wrappers, q/k/v and gate/up each in one call (DecodeStep)"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv) -> torch.Tensor:
        """The logits (B, 1, vocab) of one token per row: ``input_ids`` (B, 1), ``positions`` (B, 1) and
        ``mask`` (B, 1, 1, width) as ``SlotKV.decode`` made them for ``kv``."""
        base = self._base
        hidden = base.embed_tokens(input_ids)
        rotary = unsqueezed(base.rotary_emb(hidden, position_ids=positions))
        if self._joined is None:
            for index, layer in enumerate(self._layers):
                hidden = decoder_layer(layer, index, hidden, rotary, mask, kv, self._plan, decode=True)
        else:
            cos, sin = rotary
            half = sin.shape[-1] // 2
            signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            for layer in self._joined:
                hidden = layer.forward(hidden, cos, signed_sin, mask, kv)
        rows = hidden.shape[0]
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
