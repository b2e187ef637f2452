"""The model families the built-in engine runs, and each one's decoder layer layout, in one place.

The engine runs a decoder layer op by op (services/inference/decode_step.py) and
prefills through the layers' own forward or those same ops (layered.py); the KV
rows and masks come from kv.py. What differs between families is small and
declared here, one ``Family`` each:

- llama (SmolLM2): RMSNorm ``w * x`` in float32, SiLU-gated MLP, one rotary
  embedding, every layer attends over the whole prompt;
- qwen2: llama's layout; its q/k/v biases ride with the linear layers
  (``DecodeLinear`` and ``JoinedLinear`` carry a bias), so nothing here differs;
  sliding-window layers when its config turns them on;
- qwen3: llama's layout with an RMSNorm over each query and key head (``q_norm``,
  ``k_norm``) before the rotary embedding;
- gemma3: Gemma's RMSNorm (``x * (1 + w)``, all in float32), the per-head query and
  key norms, a norm on the attention's output and around the MLP
  (``post_attention_layernorm``, ``pre_feedforward_layernorm``,
  ``post_feedforward_layernorm``), the tanh GELU, a rotary embedding per layer type
  (local and global), sliding-window layers, the attention scaled by
  ``query_pre_attn_scalar`` (the attention module's own ``scaling``), scaled
  embeddings (the embedding module's own forward), an optional final logit
  softcap, and ``<end_of_turn>`` as a stop beside ``<eos>``.

Everything else is read off the model's own modules: the activation is the MLP's
``act_fn``, the scaling the attention module's, the embedding its forward, the
rotary embedding the model's ``rotary_emb``, so a family's rule names only what
changes the order of operations.

What is not generic, and why these four share it: the engine reaches into the
layers by transformers' module names (``self_attn.q_proj`` .. ``o_proj``,
``q_norm``/``k_norm``, ``mlp.gate_proj``/``up_proj``/``down_proj``/``act_fn``, the
layer norms named above) and calls a layer's forward with transformers' decoder
layer keywords (``attention_mask``, ``position_embeddings``, ``position_ids``,
``cache``). A family with fused projections (Phi-3's ``qkv_proj``), another MLP
or another attention (MLA, softcapped logits) needs more than a rule here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modelfiles.architectures import UnsupportedArchitecture

FULL = "full_attention"
SLIDING = "sliding_attention"


def rms_norm(hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm.forward`` (Qwen2's and Qwen3's alike), operation for operation."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * hidden.to(dtype)


def gemma_rms_norm(hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' ``Gemma3RMSNorm.forward``, operation for operation: scaled by ``1 + w``, in float32."""
    x = hidden.float()
    output = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    output = output * (1.0 + norm.weight.float())
    return output.type_as(hidden)


@dataclass(frozen=True)
class Family:
    name: str  # as modelfiles.sources.family and modelfiles.architectures name it
    model_types: tuple[str, ...]  # transformers' config.model_type
    norm: Callable[[torch.Tensor, nn.Module], torch.Tensor]
    # Per-head RMSNorm of queries and keys (the attention's q_norm and k_norm), before the rotary embedding.
    qk_norm: bool = False
    # Gemma's sandwich: a norm on the attention's output before the residual add, and one on the MLP's
    # output; the MLP's input norm is then ``pre_feedforward_layernorm`` (Llama's is post_attention_layernorm).
    sandwich_norms: bool = False
    # One rotary embedding per layer type (Gemma 3: local and global bases): ``rotary_emb(x, ids, type)``.
    rotary_per_layer_type: bool = False
    # Whether the model's forward takes a mask per layer type (a dict, as its config has layer_types).
    masks_by_layer_type: bool = True
    # Tokens that end the model's turn in its chat format, stops beside the generation config's eos ids.
    end_of_turn: tuple[str, ...] = ()

    def mlp_input_norm(self, layer: nn.Module) -> nn.Module:
        return layer.pre_feedforward_layernorm if self.sandwich_norms else layer.post_attention_layernorm

    def rotary(self, base: nn.Module, hidden: torch.Tensor, positions: torch.Tensor
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The model's (cos, sin) for each of its layer types, as its forward computes them."""
        types = sorted(set(layer_types(base.config)))
        if self.rotary_per_layer_type:
            return {kind: base.rotary_emb(hidden, positions, kind) for kind in types}
        shared = base.rotary_emb(hidden, position_ids=positions)
        return dict.fromkeys(types, shared)

    def model_mask(self, masks: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        """What the model's forward takes as ``attention_mask`` for ``SlotKV``'s masks by layer type."""
        return masks if self.masks_by_layer_type else masks[FULL]

    def logits(self, config, logits: torch.Tensor) -> torch.Tensor:
        """The output layer's logits as the model's forward finishes them (Gemma's optional softcap)."""
        cap = getattr(config, "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap


LLAMA = Family("llama", ("llama",), rms_norm, masks_by_layer_type=False)
QWEN2 = Family("qwen2", ("qwen2",), rms_norm)
QWEN3 = Family("qwen3", ("qwen3",), rms_norm, qk_norm=True)
GEMMA3 = Family("gemma3", ("gemma3_text",), gemma_rms_norm, qk_norm=True, sandwich_norms=True,
                rotary_per_layer_type=True, end_of_turn=("<end_of_turn>",))
FAMILIES = (LLAMA, QWEN2, QWEN3, GEMMA3)


def family_of(config) -> Family:
    """The family of a transformers config; ``UnsupportedArchitecture`` naming the model type, or the
    setting the engine cannot honour, otherwise."""
    model_type = getattr(config, "model_type", None)
    family = next((family for family in FAMILIES if model_type in family.model_types), None)
    if family is None:
        raise UnsupportedArchitecture(f"the built-in engine does not run model type {model_type!r}; it runs: "
                                      f"{', '.join(family.name for family in FAMILIES)}")
    # SDPA has no attention logit softcap: a model that asks for one would get other answers.
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedArchitecture(f"the built-in engine cannot run {model_type} with attn_logit_softcapping "
                                      "(its attention, SDPA, has no softcap)")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedArchitecture(f"the built-in engine runs causal decoders; this {model_type} model attends "
                                      "both ways (use_bidirectional_attention)")
    return family


def layer_types(config) -> list[str]:
    """Each decoder layer's attention type (full or sliding window); full for a config without types."""
    return list(getattr(config, "layer_types", None) or [FULL] * config.num_hidden_layers)


def attention_windows(config) -> dict[str, int | None]:
    """For each layer type of the model, how many positions back a query sees (itself included); None: all."""
    window = getattr(config, "sliding_window", None)
    return {kind: window if kind == SLIDING else None for kind in set(layer_types(config))}
