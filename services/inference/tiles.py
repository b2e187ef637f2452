"""Fixed tiles: the shape every prefill matrix multiply and attention runs at.

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

Where a prefill's rows go in its tiles (the placement), chosen per model when its
engine starts, from what this CPU's kernels do (services/inference/kernel_checks.py,
``choose_tile_placement``), and held by the model's ``KernelPlan``
(services/inference/kernel_plan.py):

- ``FROM_START``: the prefill's first token in row 0 of the first tile. A tail of
  ``n`` tokens after a reused prefix then takes ``ceil(n / tile_rows)`` tiles, the
  fewest. Chosen where a row's bits are checked not to depend on its place in a
  tile (so the tail's rows come out as in a cold prefill, where they sat elsewhere);
- ``BY_POSITION``: the token at absolute position ``p`` lands in row
  ``p % tile_rows`` of its tile (the first tile padded in front), so a tail sees
  the very tiles, at the very rows, of a cold prefill of the whole prompt; it may
  take one tile more. The fallback where the check fails.

This module is the geometry only, with no state: which placement a forward uses
is its model's plan's.
"""
from __future__ import annotations

TILE_ROWS = 16  # prefill attention's query tiles; a float32 decode step's GEMM
# The prefill GEMM's tiles: a small tile makes MKL re-read the weights once per
# tile, so larger tiles cost less, but must still be one shape computed one way
# (on AVX-512, 64-row tiles were threaded differently for one tile than for several).
GEMM_TILE_ROWS = 32
# Decode steps have at most this many rows (InferenceSettings caps max_running): in
# float32, one tile. A forward with more rows, or any prefill forward, takes the tiled GEMM.
MAX_DECODE_ROWS = TILE_ROWS

FROM_START = "from_start"
BY_POSITION = "by_position"
PLACEMENTS = (FROM_START, BY_POSITION)


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown tile placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    return placement


def first_row(start: int, tile_rows: int, placement: str) -> int:
    """Where a prefill from token ``start`` puts its first row in its first tile."""
    return 0 if placement == FROM_START else start % tile_rows


def tile_count(offset: int, rows: int, tile_rows: int) -> int:
    return -(-(offset + rows) // tile_rows)
