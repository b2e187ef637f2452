"""The start-up checks: what this CPU's kernels keep bit for bit, on the model's own layer shapes.

Machines differ: an AVX2-only CPU and one with AVX-512 BF16/VNNI and AMX run
different code inside the same torch call (meshkit/cpu_features.py).
So the engine takes nothing on trust. At start, on random inputs:

- ``check_row_independence``: the decode kernels give a row the same bits alone
  or in a batch, and the tiled GEMM gives a prefill's tail the bits of the whole
  prompt; a precision whose kernels fail it on this CPU is refused with a
  ``RowDependence`` that names it;
- ``choose_tile_placement``: whether a row's bits are independent of its place in
  a tile, so prefill rows may be placed from each prefill's start (fewer tiles);
- ``choose_one_tile_parts``: whether a one-tile GEMM split in parts keeps the bits
  of the whole multiply.

The choices go into the model's ``KernelPlan`` (services/inference/kernel_plan.py).
"""
from __future__ import annotations

import torch
from torch import nn

from meshkit.cpu_features import CpuFeatures
from services.inference.attention import prefill_attention
from services.inference.decode_linear import DECODE_KERNELS, DecodeLinear, layers_by_shape
from services.inference.families import attention_windows
from services.inference.kernel_plan import KernelPlan, kernel_plan
from services.inference.tiled_gemm import one_tile_in_parts
from services.inference.tiles import BY_POSITION, FROM_START, GEMM_TILE_ROWS, TILE_ROWS

PLACEMENT_NOTES = {
    FROM_START: "rows placed from each prefill's first row (checked: a row's bits do not depend on its place "
                "in a tile here)",
    BY_POSITION: "rows placed by absolute position (a row's bits depend on its place in a tile here)",
}


class RowDependence(ValueError):
    """A precision's kernels give a row different bits depending on the rows beside it, on this CPU."""


def check_row_independence(model: nn.Module, batch_rows: int, features: CpuFeatures) -> None:
    """Raises ``RowDependence`` unless, on this CPU, each distinct layer shape of ``model`` gives a row

    - the same bits in a decode step of ``batch_rows`` rows (and of 2) as alone, and
    - the same bits in a prefill whatever rows precede it (a tail after a reused prefix);
      the output layer, which sees one row in any prefill, is exempt.
    """
    plan = kernel_plan(model)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(), plan.placement_tried(BY_POSITION):
        for layer in layers_by_shape(model):
            name = f"{layer.in_features}->{layer.out_features}"
            x = torch.randn(3 * GEMM_TILE_ROWS, layer.in_features, generator=generator).to(layer.activation_dtype)
            alone = torch.cat([layer(x[row : row + 1]) for row in range(batch_rows)])
            for count in sorted({2, batch_rows}):
                if count <= batch_rows and not torch.equal(layer(x[:count]), alone[:count]):
                    raise RowDependence(
                        f"precision {layer.precision} cannot keep greedy output independent of the batch on this CPU "
                        f"({features.summary()}): its decode kernel ({DECODE_KERNELS[layer.precision]}) gives a "
                        f"{name} layer's rows different bits in a batch of {count} than alone; choose another "
                        f"NLPMESH_INFERENCE_DTYPE")
            if not layer.tiled_prefill:  # the output layer: one row in any prefill
                continue
            starts = (TILE_ROWS, GEMM_TILE_ROWS, 3 * GEMM_TILE_ROWS // 2 + 3, x.shape[0] - 1)
            if (start := _first_tail_unlike_whole(plan, layer, x, starts)) is not None:
                raise RowDependence(
                    f"precision {layer.precision} cannot keep a prefix-cache hit equal to a cold prefill on "
                    f"this CPU ({features.summary()}): the tiled float32 GEMM gives a {name} layer's rows "
                    f"from {start} on different bits than in the whole prompt")


def _first_tail_unlike_whole(plan: KernelPlan, layer: DecodeLinear, x: torch.Tensor,
                             starts: tuple[int, ...]) -> int | None:
    """The first of ``starts`` from which a prefill of ``x``'s rows (under the plan's placement) gives
    other bits than the prefill of all of ``x``; None when every tail matches."""
    with plan.prefill(0):
        whole = layer(x)
    for start in starts:
        with plan.prefill(start):
            if not torch.equal(layer(x[start:]), whole[start:]):
                return start
    return None


def choose_tile_placement(model: nn.Module) -> str:
    """``FROM_START`` where, on this CPU, every distinct prefill GEMM shape of ``model`` and its tiled
    attention (under the mask of each of its layer types) give a prompt's rows the same bits when a
    prefill starts at any token (its rows then sit elsewhere in their tiles, and in fewer tiles) as in
    a prefill of the whole prompt; else ``BY_POSITION``, which needs no such luck
    (``check_row_independence`` has checked it)."""
    plan = kernel_plan(model)
    generator = torch.Generator().manual_seed(1)
    starts = (1, TILE_ROWS - 3, GEMM_TILE_ROWS + 5, 2 * GEMM_TILE_ROWS + 13, 3 * GEMM_TILE_ROWS - 1)
    with torch.inference_mode(), plan.placement_tried(FROM_START):
        for layer in layers_by_shape(model):
            if not layer.tiled_prefill:
                continue
            x = torch.randn(3 * GEMM_TILE_ROWS, layer.in_features, generator=generator).to(layer.activation_dtype)
            if _first_tail_unlike_whole(plan, layer, x, starts) is not None:
                return BY_POSITION
        attention = _attention_shapes(model)
        if attention is not None:
            heads, kv_heads, head_dim, dtype = attention
            rows = 3 * GEMM_TILE_ROWS
            width = rows + 2 * TILE_ROWS  # the aligned width of a longer prompt: columns past each row masked
            query = torch.randn(1, heads, rows, head_dim, generator=generator).to(dtype)
            key, value = (torch.randn(1, kv_heads, width, head_dim, generator=generator).to(dtype) for _ in range(2))
            for mask in _attention_masks(model.config, rows, width):
                whole = prefill_attention(query, key, value, mask[None, None], plan.first_row(0, TILE_ROWS))
                for start in starts:
                    tail = prefill_attention(query[:, :, start:], key, value, mask[None, None, start:],
                                             plan.first_row(start, TILE_ROWS))
                    if not torch.equal(tail, whole[:, start:]):
                        return BY_POSITION
    return FROM_START


def _attention_masks(config, rows: int, width: int) -> list[torch.Tensor]:
    """One (rows, width) mask per layer type of the model, of the kinds ``SlotKV`` makes: causal, and for a
    sliding-window type also hiding the keys before a window (no longer than half the rows, so that the
    check's rows have keys hidden at their start, as a long prompt's rows have)."""
    columns, positions = torch.arange(width)[None, :], torch.arange(rows)[:, None]
    causal = columns <= positions
    return [causal if window is None else causal & (columns > positions - min(window, rows // 2))
            for window in attention_windows(config).values()]


def _attention_shapes(model: nn.Module) -> tuple[int, int, int, torch.dtype] | None:
    """(heads, kv heads, head dim, activation dtype) of a transformers model; None for another module."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = model.get_input_embeddings().weight.dtype
    return config.num_attention_heads, config.num_key_value_heads, head_dim, dtype


def choose_min_tiles(model: nn.Module) -> int:
    """1 where every prefill GEMM shape of ``model`` gives a tile multiplied alone the very bits of the same
    tile multiplied among several on this CPU, else 2 (one tile then goes with a zero tile: the library may
    split a batch of one along the inner dimension, and round otherwise)."""
    generator = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for layer in layers_by_shape(model):
            if not layer.tiled_prefill:
                continue
            tiles = torch.randn(2, GEMM_TILE_ROWS, layer.in_features, generator=generator)
            weight = layer.weight_float32.t()
            if not torch.equal(torch.bmm(tiles[:1], weight[None])[0], _among_several(tiles, weight)):
                return 2
    return 1


def _among_several(tiles: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """The first of ``tiles`` multiplied in one batch with the others: what a tile gets in a prefill of several."""
    return torch.bmm(tiles, weight_t.expand(tiles.shape[0], *weight_t.shape))[0]


def choose_one_tile_parts(model: nn.Module, threads: int) -> int:
    """``threads`` where every prefill GEMM shape of ``model`` gives a one-tile multiply split in that
    many parts the very bits of the tile multiplied among several on this CPU (and there are 2 threads or
    more), else 1. Prefill GEMM tiles only: the float32 decode tile and the output layer are never split."""
    if threads < 2:
        return 1
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for layer in layers_by_shape(model):
            if not layer.tiled_prefill or layer.out_features % threads:
                continue
            tiles = torch.randn(2, GEMM_TILE_ROWS, layer.in_features, generator=generator)
            whole = _among_several(tiles, layer.weight_float32.t())
            if not torch.equal(one_tile_in_parts(tiles[0], layer.weight_float32, threads), whole):
                return 1
    return threads
