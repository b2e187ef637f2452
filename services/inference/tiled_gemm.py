"""The prefill GEMM: float32, in fixed tiles, so a row's bits never depend on how many rows come with it.

Prefill computes many rows against the same weights, so it is bound by arithmetic
and wants a blocked GEMM that reuses each weight across rows: float32 GEMM (MKL
sgemm) is the one that blocks well on every x86 CPU torch runs on, while a
bfloat16 GEMM is fast only where the CPU has AVX-512 BF16 or AMX. A single GEMM
over all rows does not keep rows independent (MKL picks kernel and threading from
the row count, and CPUs differ in where that changes the rounding), so every
prefill GEMM runs in tiles of one fixed shape, all tiles one batched call
(services/inference/tiles.py). This costs prefill some speed (MKL reads the
weights once per tile rather than once per call).

A prefill of one tile (a prefix hit's tail; a chunk beside decoding streams) is a
skinny multiply bound by reading the weights, and MKL reads them for one multiply
slower than one thread each for ``parts`` multiplies of a share of the outputs. So
a one-tile multiply may run in parts, where the engine has checked at start that
each part's outputs have the very bits of the whole multiply
(services/inference/kernel_checks.py, ``choose_one_tile_parts``).
"""
from __future__ import annotations

import torch

from services.inference.tiles import tile_count


def tiled_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile_rows: int, offset: int,
               parts: int = 1, min_tiles: int = 1) -> torch.Tensor:
    """``x @ weight.T + bias`` in float32, (rows, in) -> (rows, out), as one batched multiply of
    ``tile_rows``-row tiles, the first row at row ``offset`` of the first tile; a single tile in ``parts``
    multiplies of a share of the outputs each, or with zero tiles added up to ``min_tiles`` (where one tile
    alone rounds unlike a tile among several: ``kernel_checks.choose_min_tiles``)."""
    rows, columns = x.shape
    tiles = tile_count(offset, rows, tile_rows)
    if tiles == 1 and parts > 1 and weight.shape[0] % parts == 0:
        pass  # split in parts, checked at start to give the bits of a tile among several
    elif tiles < min_tiles:
        tiles = min_tiles
    if offset == 0 and rows == tiles * tile_rows:  # whole tiles: nothing to pad
        padded = x.to(torch.float32)
    else:
        padded = x.new_zeros(tiles * tile_rows, columns, dtype=torch.float32)
        padded[offset : offset + rows] = x
    if tiles == 1 and parts > 1 and weight.shape[0] % parts == 0:
        out = one_tile_in_parts(padded, weight, parts)
    else:
        transposed = weight.t()
        out = torch.bmm(padded.view(tiles, tile_rows, columns), transposed.expand(tiles, *transposed.shape))
    out = out.view(tiles * tile_rows, -1)[offset : offset + rows]
    return out if bias is None else out + bias.float()


def one_tile_in_parts(tile: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    """One tile (rows, in) @ weight.T as ``parts`` batch items, each a share of the outputs."""
    rows, columns = tile.shape
    shares = weight.view(parts, weight.shape[0] // parts, columns).transpose(1, 2)
    return torch.bmm(tile.expand(parts, rows, columns), shares).transpose(0, 1).reshape(rows, -1)
