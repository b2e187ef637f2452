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

Where a prefill's rows go in its tiles (``placement``), chosen once at start by the
engine from what this CPU's kernels do (services/inference/precision.py,
``choose_tile_placement``):

- ``FROM_START``: the prefill's first token in row 0 of the first tile. A tail of
  ``n`` tokens after a reused prefix then takes ``ceil(n / tile_rows)`` tiles, the
  fewest. Chosen where a row's bits are checked not to depend on its place in a
  tile (so the tail's rows come out as in a cold prefill, where they sat elsewhere);
- ``BY_POSITION``: under ``prefill_phase(start)`` the token at absolute position
  ``p`` lands in row ``p % tile_rows`` of its tile (the first tile padded in front),
  so a tail sees the very tiles, at the very rows, of a cold prefill of the whole
  prompt; it may take one tile more. The fallback where the check fails.
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

FROM_START = "from_start"
BY_POSITION = "by_position"
PLACEMENTS = (FROM_START, BY_POSITION)
_placement = BY_POSITION  # until the engine has checked this CPU


def set_placement(placement: str) -> None:
    """Sets how prefill rows are laid out in tiles, for the whole process (one CPU, one choice)."""
    global _placement
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown tile placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    _placement = placement


@contextmanager
def placed(how: str) -> Iterator[None]:
    """``set_placement(how)`` for this block (the engine's start-up checks try each)."""
    before = _placement
    set_placement(how)
    try:
        yield
    finally:
        set_placement(before)


@contextmanager
def prefill_phase(start: int = 0) -> Iterator[None]:
    """Forwards in this block (on this thread) prefill a prompt from token ``start`` on."""
    _phase.prefill, _phase.start = True, start
    try:
        yield
    finally:
        _phase.prefill, _phase.start = False, 0


@contextmanager
def rows_skipped(count: int) -> Iterator[None]:
    """Inside a prefill: forwards in this block compute the prefill's rows from its ``count``-th on,
    placed as a prefill from that token would place them (by position: each at its row of the whole
    prefill's tiles; from the start: the first of them in row 0)."""
    start = getattr(_phase, "start", 0)
    _phase.start = start + count
    try:
        yield
    finally:
        _phase.start = start


def in_prefill() -> bool:
    return getattr(_phase, "prefill", False)


def tile_offset(tile_rows: int) -> int:
    """Where the current prefill's first row goes in its tile (0 outside a prefill)."""
    return first_row(getattr(_phase, "start", 0), tile_rows)


def first_row(start: int, tile_rows: int) -> int:
    """Where a prefill from token ``start`` puts its first row in its first tile."""
    return 0 if _placement == FROM_START else start % tile_rows


def tile_count(offset: int, rows: int, tile_rows: int) -> int:
    return -(-(offset + rows) // tile_rows)
