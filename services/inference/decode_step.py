"""The engine's decode step: the model's own operations, without its wrappers, for each family it runs.

A decode step is one row per sequence through every decoder layer. Through the
model's ``forward`` each layer also passes transformers' generic machinery:
keyword plumbing, deprecation and checkpointing wrappers, the attention and mask
interfaces, output objects. With a model this small on a CPU, that Python is a
good part of the step (bench/engine_speed.py measures the step). ``DecodeStep``
calls the very same operations in the same order on the same modules and weights
(each norm as the family's RMSNorm computes it, the rotary embedding from the
model's own ``rotary_emb``, the activation its MLP's own ``act_fn``, the KV write
through ``SlotKV.update``, attention through transformers' SDPA function, each
linear layer through its decode kernel:
``DecodeLinear.decode_rows``), so its logits are bit-identical to the model's
forward (tests/integration/test_inference_decode_step.py), and everything said about
batch invariance holds unchanged. Where the precision's kernel gives the same
bits for outputs side by side (checked at start), q, k and v are one kernel call
and gate and up another (``JoinedLayer``, through ``JoinedLinear``,
services/inference/joined_linear.py). Prefill chunks run their decoder layers
through the same ``decoder_layer`` (services/inference/layered.py), with the
layers' tiled GEMM and the tiled attention, bit-identical to the layers' own
forward.

What differs between Llama (SmolLM2), Qwen2, Qwen3 and Gemma 3 layers is the
family's rule (services/inference/families.py): which norms, where, of which kind,
and which rotary embedding and mask each layer type takes. ``decode_step_for``
gives a step for a model of one of them whose linear layers are ``DecodeLinear``
(services/inference/decode_linear.py); the engine uses the model's forward for
any other (on CUDA, say).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from services.inference.attention import NAME as TILED_ATTENTION
from services.inference.decode_linear import DecodeLinear
from services.inference.families import Family, family_of, layer_types
from services.inference.joined_linear import JoinedLinear
from services.inference.kernel_plan import KernelPlan, kernel_plan


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decoder_layer(layer: nn.Module, index: int, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                  mask, kv, plan: KernelPlan, family: Family, *, decode: bool,
                  outputs: int | None = None, attend=None) -> torch.Tensor:
    """One decoder layer of ``family`` as its forward computes it, without its wrappers: ``hidden``
    (B, n, hidden), ``rotary`` the model's (cos, sin) for this layer's type already unsqueezed to
    (B, 1, n, head_dim), ``mask`` this layer type's. A decode step (``decode``) takes each linear
    layer's decode kernel and transformers' SDPA function; a prefill chunk (under ``plan.prefill``,
    ``plan`` the model's) the layers' own forward (tiled GEMM) and the model's attention interface
    (the tiled attention).

    ``outputs`` (prefill only): the layer's keys and values are written for every row, but its output
    is computed for the last ``outputs`` rows only (None: all), each row placed in its tile as the
    placement places a prefill from it (``KernelPlan.rows_skipped``; where rows go from each prefill's
    start, a row's bits are checked not to depend on its place), so with the same bits; with 0 the
    input comes back unchanged.
    ``attend`` (prefill only): the attention function, in place of the model's attention interface (a
    packed prefill's: services/inference/layered.py), given ``mask`` as it is.
    The model's last layer needs only the prompt's last row, for the logits, and nothing in a chunk
    before the prompt's last."""
    attention, mlp, norm = layer.self_attn, layer.mlp, family.norm
    rows = hidden.shape[:-1]
    project = _decode_rows if decode else _prefill_rows
    if attend is None:
        attend = sdpa_attention_forward if decode else ALL_ATTENTION_FUNCTIONS[attention.config._attn_implementation]
    cos, sin = rotary
    head_dim = attention.head_dim
    x = norm(hidden, layer.input_layernorm)
    key = _heads(project(attention.k_proj, x), head_dim)
    if family.qk_norm:
        key = norm(key, attention.k_norm)
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
        if family.qk_norm:
            query = norm(query, attention.q_norm)
        query = query * cos + _rotate_half(query) * sin
        output, _ = attend(attention, query, keys, values, mask, dropout=0.0, scaling=attention.scaling)
        attended = project(attention.o_proj, output.reshape(*hidden.shape[:-1], -1).contiguous())
        if family.sandwich_norms:
            attended = norm(attended, layer.post_attention_layernorm)
        hidden = hidden + attended
        x = norm(hidden, family.mlp_input_norm(layer))
        mlp_out = project(mlp.down_proj, mlp.act_fn(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))
        if family.sandwich_norms:
            mlp_out = norm(mlp_out, layer.post_feedforward_layernorm)
        return hidden + mlp_out


def _heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, n, heads * head_dim) -> (B, heads, n, head_dim)."""
    return projected.view(*projected.shape[:-1], -1, head_dim).transpose(1, 2)


def _decode_rows(linear: DecodeLinear, x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in) through the linear layer's decode kernel."""
    return linear.decode_rows(x.view(-1, linear.in_features)).view(*x.shape[:-1], -1)


def _prefill_rows(linear: DecodeLinear, x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in) through the linear layer's forward: the tiled GEMM in a prefill."""
    return linear(x)


def unsqueezed(rotary: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer type's (cos, sin) (B, n, head_dim) as (B, 1, n, head_dim), as the attention applies them."""
    return {kind: (cos.unsqueeze(1), sin.unsqueeze(1)) for kind, (cos, sin) in rotary.items()}


class JoinedLayer:
    """One decoder layer's decode step with q, k and v in one kernel call and gate and up in another
    (``JoinedLinear``), and the rotary embedding of the queries and keys in one go where no per-head
    norm comes between (``rotate_half(x) * sin`` is ``roll(x, half) * sin`` with the sine's first half
    negated, since ``(-a) * b`` and ``a * (-b)`` are the same number). The same operations on the same
    values as ``decoder_layer`` for the same family, so the same bits, in fewer calls."""

    __slots__ = ("activation", "attention_out_norm", "down", "family", "gate_up", "groups", "head_dim", "heads",
                 "index", "input_norm", "intermediate", "k_norm", "kind", "kv_heads", "mlp_norm", "mlp_out_norm",
                 "o_proj", "q_norm", "qkv", "scaling")

    def __init__(self, layer: nn.Module, index: int, kind: str, family: Family, qkv: JoinedLinear,
                 gate_up: JoinedLinear):
        attention = layer.self_attn
        self.index, self.kind, self.family, self.qkv, self.gate_up = index, kind, family, qkv, gate_up
        self.o_proj, self.down, self.activation = attention.o_proj, layer.mlp.down_proj, layer.mlp.act_fn
        self.input_norm, self.mlp_norm = layer.input_layernorm, family.mlp_input_norm(layer)
        self.q_norm = attention.q_norm if family.qk_norm else None
        self.k_norm = attention.k_norm if family.qk_norm else None
        self.attention_out_norm = layer.post_attention_layernorm if family.sandwich_norms else None
        self.mlp_out_norm = layer.post_feedforward_layernorm if family.sandwich_norms else None
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.heads = attention.q_proj.out_features // self.head_dim
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self.groups = self.heads // self.kv_heads
        self.intermediate = layer.mlp.gate_proj.out_features

    def forward(self, hidden: torch.Tensor, rotary: dict[str, tuple[torch.Tensor, torch.Tensor]],
                masks: dict[str, torch.Tensor], kv) -> torch.Tensor:
        """``hidden`` (B, 1, hidden); ``rotary`` each layer type's ``cos`` and ``signed_sin`` (B, 1, 1, head_dim)."""
        rows, heads, kv_heads, head_dim = hidden.shape[0], self.heads, self.kv_heads, self.head_dim
        norm = self.family.norm
        cos, signed_sin = rotary[self.kind]
        x = norm(hidden, self.input_norm).view(rows, -1)
        qkv = self.qkv.decode_rows(x).view(rows, 1, -1, head_dim)  # (B, 1, heads + 2 kv_heads, head_dim)
        if self.q_norm is None:
            rotated = _rotated(qkv[:, :, : heads + kv_heads], cos, signed_sin)
            query, key = rotated[:, :, :heads], rotated[:, :, heads:]
        else:
            query = _rotated(norm(qkv[:, :, :heads], self.q_norm), cos, signed_sin)
            key = _rotated(norm(qkv[:, :, heads : heads + kv_heads], self.k_norm), cos, signed_sin)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        keys, values = kv.update(key, value, self.index)
        if self.groups > 1:  # transformers' pack_gqa for one query token: the query heads by their KV head
            query = query.reshape(rows, kv_heads, self.groups, head_dim)
        output = F.scaled_dot_product_attention(query, keys, values, attn_mask=masks[self.kind], dropout_p=0.0,
                                                scale=self.scaling, is_causal=False)
        output = output.reshape(rows, -1, 1, head_dim).transpose(1, 2).contiguous().view(rows, -1)
        attended = self.o_proj.decode_rows(output).view(rows, 1, -1)
        if self.attention_out_norm is not None:
            attended = norm(attended, self.attention_out_norm)
        hidden = hidden + attended
        gate_up = self.gate_up.decode_rows(norm(hidden, self.mlp_norm).view(rows, -1))
        intermediate = self.intermediate
        activated = self.activation(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        mlp_out = self.down.decode_rows(activated).view(rows, 1, -1)
        if self.mlp_out_norm is not None:
            mlp_out = norm(mlp_out, self.mlp_out_norm)
        return hidden + mlp_out


def _rotated(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin


def joined_layers(layers: list[nn.Module], kinds: list[str], family: Family) -> list[JoinedLayer] | None:
    """A ``JoinedLayer`` for every layer, or None where the precision's kernels cannot join them bit for bit."""
    joined = []
    for index, (layer, kind) in enumerate(zip(layers, kinds)):
        attention, mlp = layer.self_attn, layer.mlp
        qkv = JoinedLinear.join([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up = JoinedLinear.join([mlp.gate_proj, mlp.up_proj])
        if qkv is None or gate_up is None:
            return None
        joined.append(JoinedLayer(layer, index, kind, family, qkv, gate_up))
    return joined


class DecodeStep:
    def __init__(self, model: nn.Module, family: Family):
        self._family = family
        self._config = model.config
        self._base = model.base_model
        self._output = model.get_output_embeddings()
        self._layers = list(self._base.layers)
        self._kinds = layer_types(model.config)
        self._plan = kernel_plan(model)
        self._joined = joined_layers(self._layers, self._kinds, family)

    @property
    def description(self) -> str:
        if self._joined is None:
            return "the model's operations without transformers' wrappers (DecodeStep)"
        return "the model's operations without transformers' wrappers, q/k/v and gate/up each in one call (DecodeStep)"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, masks: dict[str, torch.Tensor],
                kv) -> torch.Tensor:
        """The logits (B, 1, vocab) of one token per row: ``input_ids`` (B, 1), ``positions`` (B, 1) and
        ``masks`` (B, 1, 1, width) by layer type as ``SlotKV.decode`` made them for ``kv``."""
        base, family = self._base, self._family
        hidden = base.embed_tokens(input_ids)
        rotary = unsqueezed(family.rotary(base, hidden, positions))
        if self._joined is None:
            for index, (layer, kind) in enumerate(zip(self._layers, self._kinds)):
                hidden = decoder_layer(layer, index, hidden, rotary[kind], masks[kind], kv, self._plan, family,
                                       decode=True)
        else:
            signed = {kind: (cos, _signed_sin(sin)) for kind, (cos, sin) in rotary.items()}
            for layer in self._joined:
                hidden = layer.forward(hidden, signed, masks, kv)
        rows = hidden.shape[0]
        logits = self._output.decode_rows(family.norm(hidden, base.norm).view(rows, -1)).view(rows, 1, -1)
        return family.logits(self._config, logits)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sine with its first half negated (see ``JoinedLayer``)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def decode_step_for(model: nn.Module) -> DecodeStep | None:
    """A ``DecodeStep`` for a model of a family the engine runs (services/inference/families.py) whose linear
    layers are all ``DecodeLinear``; None for another module. A transformers model of another family is
    refused (``UnsupportedArchitecture``), as the engine refuses it at start."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    family = family_of(config)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", TILED_ATTENTION):  # both decode through SDPA
        return None
    linears = [module for module in model.modules() if isinstance(module, nn.Linear | DecodeLinear)]
    if not linears or not all(isinstance(module, DecodeLinear) for module in linears):
        return None
    return DecodeStep(model, family)
