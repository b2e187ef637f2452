"""Fixed 16-row tiles: the shape every prefill matrix multiply and attention runs at.

CPU libraries choose their kernel, blocking and threading from a multiply's
shape, and rows computed by different kernels round differently. So a row's
bits could depend on how many rows share a call: a prompt's tail prefilled
after a reused prefix would then come out unlike the same tokens in a cold
prefill. Which shapes are affected differs between CPUs (AVX2-only machines and
AVX-512 BF16/VNNI/AMX ones take different code paths), so instead of relying on
one machine's measurements the engine never varies the shape: prefill rows are
laid out in tiles of a fixed number of rows (``GEMM_TILE_ROWS`` for the linear
layers, ``TILE_ROWS`` for attention), every tile one item of one batched call, so
each tile is one and the same small multiply however many tiles there are.

Under ``prefill_phase(start)`` the rows are placed so that the token at absolute
position ``p`` lands in row ``p % tile_rows`` of its tile (the first tile is padded
in front): a tail starting after a reused prefix sees the very tiles, at the very
positions, that a cold prefill of the whole prompt computes for those tokens.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

TILE_ROWS = 16  # prefill attention's query tiles; a float32 decode step's GEMM
# The prefill GEMM's tiles: a small tile makes MKL re-read the weights once per
# tile, so larger tiles cost less, but must still be one shape computed one way
# (on AVX-512, 64-row tiles were threaded differently for one tile than for several).
GEMM_TILE_ROWS = 32
_phase = threading.local()


@contextmanager
def prefill_phase(start: int = 0) -> Iterator[None]:
    """Forwards in this block (on this thread) prefill a prompt from token ``start`` on."""
    _phase.prefill, _phase.start = True, start
    try:
        yield
    finally:
        _phase.prefill, _phase.start = False, 0


def in_prefill() -> bool:
    return getattr(_phase, "prefill", False)


def tile_offset(tile_rows: int) -> int:
    """Where the first row goes in its tile: the prefill's start position modulo ``tile_rows`` (0 outside)."""
    return getattr(_phase, "start", 0) % tile_rows


def tile_count(offset: int, rows: int, tile_rows: int) -> int:
    return -(-(offset + rows) // tile_rows)
