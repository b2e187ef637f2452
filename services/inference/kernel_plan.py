"""How one model's kernels run: chosen for this CPU when its engine starts, held per model.

Which kernel a ``DecodeLinear`` or the tiled attention runs depends on settings
chosen at start (where a prefill's rows go in their tiles, whether a one-tile
GEMM is split in parts) and on whether the forward is a prefill, and from which
token. None of these may live in a module global or a thread-local: two models
(two engines) in one process would then switch each other's kernels. So each
model converted by ``apply_precision`` gets one ``KernelPlan``, shared by its
linear layers and its attention modules and nowhere else; its engine configures
it at start (``Engine.kernels``) and marks its prefill forwards with
``plan.prefill(start)``. Engines given the same model object share its plan:
one model, one set of weights, one choice for this CPU.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from services.inference.tiles import BY_POSITION, MAX_DECODE_ROWS, check_placement, first_row

ATTRIBUTE = "kernel_plan"  # the plan's name on the model and on its attention modules


class KernelPlan:
    """A model's kernel settings and the phase of the forward running through it."""

    def __init__(self, placement: str = BY_POSITION, one_tile_parts: int = 1, gemm_rows: int = MAX_DECODE_ROWS + 1,
                 min_tiles: int = 2):
        # Where prefill rows go in their tiles (services/inference/tiles.py); by position until the
        # engine has checked this CPU.
        self.placement = check_placement(placement)
        # A one-tile prefill GEMM in this many multiplies (services/inference/tiled_gemm.py).
        self.one_tile_parts = one_tile_parts
        # A prefill GEMM of fewer tiles runs with zero tiles added up to this many: on some CPUs a batched
        # multiply of one tile rounds unlike the same tile among several (services/inference/tiled_gemm.py).
        # 2 until the engine has checked this CPU (kernel_checks.choose_min_tiles).
        self.min_tiles = min_tiles
        # A forward of this many rows or more takes the float32 GEMM even outside a prefill (a test sets
        # it out of reach to measure the decode kernels).
        self.gemm_rows = gemm_rows
        self._prefill_start: int | None = None  # None: not in a prefill

    def __repr__(self) -> str:
        return (f"KernelPlan(placement={self.placement!r}, one_tile_parts={self.one_tile_parts}, "
                f"gemm_rows={self.gemm_rows}, min_tiles={self.min_tiles}, prefill_start={self._prefill_start})")

    @property
    def prefilling(self) -> bool:
        return self._prefill_start is not None

    def first_row(self, start: int, tile_rows: int) -> int:
        """Where a prefill from token ``start`` puts its first row in its first tile, under this plan."""
        return first_row(start, tile_rows, self.placement)

    def tile_offset(self, tile_rows: int) -> int:
        """Where the current prefill's first row goes in its tile (0 outside a prefill)."""
        return first_row(self._prefill_start or 0, tile_rows, self.placement)

    @contextmanager
    def prefill(self, start: int = 0) -> Iterator[None]:
        """Forwards through the model in this block prefill a prompt from token ``start`` on."""
        before = self._prefill_start
        self._prefill_start = start
        try:
            yield
        finally:
            self._prefill_start = before

    @contextmanager
    def rows_skipped(self, count: int) -> Iterator[None]:
        """Inside a prefill: forwards in this block compute the prefill's rows from its ``count``-th on,
        placed as a prefill from that token would place them (by position: each at its row of the whole
        prefill's tiles; from the start: the first of them in row 0)."""
        before = self._prefill_start
        if before is not None:
            self._prefill_start = before + count
        try:
            yield
        finally:
            self._prefill_start = before

    @contextmanager
    def placement_tried(self, placement: str) -> Iterator[None]:
        """``placement`` for this block (the start-up checks try each)."""
        before = self.placement
        self.placement = check_placement(placement)
        try:
            yield
        finally:
            self.placement = before


def kernel_plan(model: nn.Module) -> KernelPlan:
    """The plan ``apply_precision`` gave ``model``. A model it did not convert (its own linear layers, or
    on CUDA) gets a default one here: its kernels read none, but its engine's prefill chunks still end on
    the tile boundaries of the plan's placement."""
    plan = getattr(model, ATTRIBUTE, None)
    if plan is None:
        plan = KernelPlan()
        setattr(model, ATTRIBUTE, plan)
    return plan
