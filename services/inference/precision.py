"""Choosing the precision a model runs in on this CPU, and converting it.

Each ``nn.Linear`` becomes a ``DecodeLinear`` (services/inference/decode_linear.py):
a decode kernel in the precision chosen, and a float32 copy for prefill's tiled
GEMM (services/inference/tiled_gemm.py). The model gets one ``KernelPlan``
(services/inference/kernel_plan.py), shared by its layers, that its engine
configures at start. ``auto`` (the default) takes the fastest precision whose
kernels pass the start-up checks on this CPU (services/inference/kernel_checks.py):
decode reads every weight once a token, so the fewest bytes first.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from meshkit.cpu_features import CpuFeatures
from services.inference.attention import use_tiled_attention
from services.inference.decode_linear import DECODE_KERNELS, DecodeLinear, layers_by_shape
from services.inference.kernel_checks import RowDependence, check_row_independence
from services.inference.kernel_plan import ATTRIBUTE, KernelPlan
from services.inference.tiles import GEMM_TILE_ROWS, MAX_DECODE_ROWS, TILE_ROWS

__all__ = ["FASTEST_FIRST", "MAX_DECODE_ROWS", "PRECISIONS", "apply_fastest_precision", "apply_precision",
           "kernel_paths", "model_precision"]

log = logging.getLogger("nlpmesh.inference")

PRECISIONS = ("int8", "int4", "bfloat16", "float32")
# ``auto`` takes the first of these whose kernels keep a row's bits independent of the batch on this
# CPU. Each is within the perplexity guard (tests/integration/test_inference_precision.py).
FASTEST_FIRST = ("int4", "int8", "bfloat16", "float32")


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """Puts ``model`` in ``precision``: every ``nn.Linear`` (lm_head included) becomes a
    ``DecodeLinear``; in bfloat16, int8 and int4 the rest (embeddings, norms, activations,
    KV cache) goes to bfloat16, in float32 it stays float32. In int4 the output layer is
    int8: its error lands straight on the logits, where int4 costs far more perplexity than in
    every other layer together. A transformers model also gets the tiled prefill attention.
    The model gets a ``KernelPlan`` of its own (``kernel_plan.kernel_plan(model)``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        model = model.float()
    plan = KernelPlan()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                own = "int8" if precision == "int4" and child is output else precision
                setattr(module, name, DecodeLinear(child, own, plan))
    if precision != "float32":
        for module in model.modules():  # the other weights; buffers (RoPE frequencies) stay as they are
            if not isinstance(module, DecodeLinear):
                for parameter in module.parameters(recurse=False):
                    parameter.data = parameter.data.to(torch.bfloat16)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(output, DecodeLinear):
        output.tiled_prefill = False
    setattr(model, ATTRIBUTE, plan)
    use_tiled_attention(model, plan)
    return model


def apply_fastest_precision(load: Callable[[], nn.Module], features: CpuFeatures,
                            allowed: tuple[str, ...] = FASTEST_FIRST) -> nn.Module:
    """``auto``: the model from ``load()`` in the first precision of ``FASTEST_FIRST`` among ``allowed`` (the
    model's catalogue entry's ``precisions``: a model may lose too much in one, as Gemma 3 270M does in int4)
    whose kernels pass ``check_row_independence`` on this CPU (for the largest decode batch), each refusal
    and the choice logged. Loads again after a refusal (``apply_precision`` converts in place)."""
    candidates = [precision for precision in FASTEST_FIRST if precision in allowed]
    if not candidates:
        raise ValueError(f"precision auto needs one of {', '.join(FASTEST_FIRST)} allowed; the model allows "
                         f"{', '.join(allowed)}")
    refusals = []
    for precision in candidates:
        try:
            model = apply_precision(load(), precision)
            check_row_independence(model, MAX_DECODE_ROWS, features)
        except ValueError as refused:  # RowDependence, or layer shapes the precision cannot take
            log.warning("precision %s refused on this CPU: %s", precision, refused)
            refusals.append(precision)
            continue
        log.info("precision auto: %s, the fastest whose kernels keep rows independent here%s", precision,
                 f" ({', '.join(refusals)} refused)" if refusals else "")
        return model
    raise RowDependence(f"no precision keeps greedy output independent of the batch on this CPU "
                        f"({features.summary()}); tried {', '.join(candidates)}")


def model_precision(model: nn.Module) -> str | None:
    """The precision ``apply_precision`` gave ``model``; None for a model it did not touch."""
    layers = layers_by_shape(model)
    return layers[0].precision if layers else None


def kernel_paths(model: nn.Module) -> str:
    """One line naming the kernels ``model`` runs (for the engine's start-up log)."""
    precision = model_precision(model)
    if precision is None:
        return "the model's own linear layers (no DecodeLinear)"
    return (f"{precision}: decode {DECODE_KERNELS[precision]}; prefill float32 GEMM in {GEMM_TILE_ROWS}-row tiles; "
            f"prefill attention in {TILE_ROWS}-query tiles")
