"""The running batch's KV memory: one row per sequence, one forward for all rows.

transformers' model code calls ``cache.update(keys, values, layer_idx)`` in every
attention layer; ``SlotKV`` answers it from preallocated buffers

    keys[layer]: (rows, kv_heads, capacity, head_dim)     (values alike)

where row ``r`` holds one sequence's tokens in columns ``0 .. length - 1``. Rows
stay packed (``0 .. used - 1``), so a decode step reads plain views and copies
no KV: each row writes its new token at its own column and the attention mask
hides every row's columns past its own length. The decoding rows come first
(``0 .. ready - 1``); the rows after them are still being prefilled, chunk by
chunk, and each joins the decoding rows with ``mark_ready``. A forward is one of

- ``prefill(row, start, n, total)``: ``n`` prompt tokens of one row, after
  ``start`` tokens already in place (a reused prefix, or earlier chunks), of a
  prompt of ``total`` tokens;
- ``prefill_packed(segments)``: several such prompt chunks, each of its own row,
  in one forward (services/inference/layered.py ``PackedForward``);
- ``decode(lengths)``: one new token for each of the rows ``0 .. B - 1``.

The model is called with our 4-D boolean masks, one per layer type (full or
sliding-window attention, services/inference/families.py), and explicit position
ids, which transformers uses as given. A sliding-window layer's row keeps every
token's keys and values too, not a ring of the last ``window``: its mask hides
the keys before the window (``key position > query position - window``), as the
model's own mask does. That keeps one KV layout for every layer (one tensor, one
row move, prefix blocks of the same shape), so a reused prefix block holds what
any layer type needs, at the price of memory the window would not need. Freeing a row moves another row into it, so
sequences must ask ``row_of`` after each ``free``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import PretrainedConfig

from services.inference.families import attention_windows

# Columns are added in steps of this many tokens (grown by doubling past it).
INITIAL_CAPACITY = 512
# Attention always spans a multiple of this many columns (the extra ones masked).
# CPU attention sums in vector lanes, and a width that is not a multiple of the
# lane count takes a tail path that rounds differently; with aligned widths a
# row's attention gives the same bits alone or beside longer rows, so greedy
# output does not depend on what else is running.
WIDTH_ALIGN = 16


def _aligned(width: int) -> int:
    return -(-width // WIDTH_ALIGN) * WIDTH_ALIGN


class SlotKV:
    def __init__(self, config: PretrainedConfig, rows: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.windows = attention_windows(config)  # layer type -> positions a query sees (None: all)
        self.rows = rows
        self.dtype = dtype
        self.device = torch.device(device)
        self.capacity = 0
        # keys and values of every layer in one tensor each: (layers, rows, kv_heads, capacity, head_dim)
        self._keys = torch.empty(0)
        self._values = torch.empty(0)
        self._owners: list[object] = []  # row -> its sequence
        self.ready = 0  # rows 0 .. ready - 1 decode; a row after them is being prefilled
        self._forward: _Prefill | _Packed | _Decode | None = None

    # -- rows ---------------------------------------------------------------

    @property
    def used(self) -> int:
        return len(self._owners)

    @property
    def owners(self) -> tuple[object, ...]:
        """The sequences in row order."""
        return tuple(self._owners)

    @property
    def ready_owners(self) -> tuple[object, ...]:
        """The decoding sequences, in row order (rows ``0 .. ready - 1``)."""
        return tuple(self._owners[: self.ready])

    def shrink(self) -> None:
        """With no rows in use, drops buffers grown past the initial size (a long prompt's memory)."""
        if not self._owners and self.capacity > INITIAL_CAPACITY:
            self._keys = self._values = torch.empty(0)
            self.capacity = 0

    def allocate(self, owner: object) -> int:
        """A row for a sequence about to be prefilled, after the decoding rows and those being prefilled."""
        if self.used >= self.rows:
            raise RuntimeError("no free KV row")  # the engine admits at most `rows` sequences
        self._owners.append(owner)
        return self.used - 1

    def mark_ready(self, owner: object) -> None:
        """``owner``'s prompt is all in its row: from the next step it decodes with the others. Its row
        trades places with the first row being prefilled, so the decoding rows stay ``0 .. ready - 1``."""
        row = self.row_of(owner)
        if row < self.ready:
            raise RuntimeError("that row already decodes")
        self._swap(row, self.ready)
        self.ready += 1

    def free(self, owner: object) -> None:
        """Releases ``owner``'s row. The last decoding row takes a decoding row's place and the last row
        fills the hole this leaves, so both groups stay packed (their KV moves too)."""
        row = self._owners.index(owner)
        if row < self.ready:
            self.ready -= 1
            self._move(self.ready, row)  # the last decoding row fills the hole ...
            row = self.ready
        self._move(self.used - 1, row)  # ... and the row being prefilled, if any, the one it left
        self._owners.pop()

    def _swap(self, one: int, other: int) -> None:
        if one != other:
            if self.capacity:
                for buffers in (self._keys, self._values):
                    held = buffers[:, one].clone()
                    buffers[:, one] = buffers[:, other]
                    buffers[:, other] = held
            self._owners[one], self._owners[other] = self._owners[other], self._owners[one]

    def _move(self, source: int, target: int) -> None:
        if source != target:
            if self.capacity:
                self._keys[:, target] = self._keys[:, source]
                self._values[:, target] = self._values[:, source]
            self._owners[target] = self._owners[source]

    def row_of(self, owner: object) -> int:
        return self._owners.index(owner)

    def reserve(self, length: int) -> None:
        """Makes room for ``length`` tokens per row (grows by doubling, copying used rows)."""
        if length <= self.capacity:
            return
        capacity = max(INITIAL_CAPACITY, self.capacity)
        while capacity < length:
            capacity *= 2
        shape = (self.layers, self.rows, self.kv_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.capacity:
            keys[:, :, :, : self.capacity] = self._keys
            values[:, :, :, : self.capacity] = self._values
        self._keys, self._values, self.capacity = keys, values, capacity

    # -- blocks of KV, for prefix reuse ----------------------------------------

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """A copy of one row's KV for tokens ``start .. end - 1``: (2, layers, kv_heads, n, head_dim), on the CPU
        (where the prefix tiers keep and encode blocks)."""
        kv = torch.stack((self._keys[:, row, :, start:end], self._values[:, row, :, start:end]))
        return kv.cpu() if kv.device.type != "cpu" else kv

    def write(self, row: int, start: int, kv: torch.Tensor) -> None:
        """Puts KV read by ``read`` (or rebuilt from Redis) at ``start`` in ``row``."""
        end = start + kv.shape[3]
        self.reserve(end)
        kv = kv.to(self.device)
        self._keys[:, row, :, start:end] = kv[0]
        self._values[:, row, :, start:end] = kv[1]

    # -- forwards -------------------------------------------------------------

    def prefill(self, row: int, start: int, count: int, total: int | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sets up a forward of ``count`` tokens for ``row``; returns (position_ids, masks): a 4-D boolean
        mask (1, 1, count, width) for each layer type.

        Attention spans the whole prompt's aligned width (``total`` tokens; ``start + count``
        by default) whichever chunk of it this is, columns past the chunk masked: every
        chunk's attention is then the very computation a prefill of the whole prompt does
        for those rows (services/inference/attention.py), so chunking never changes an answer.
        """
        total = start + count if total is None else total
        if not 0 <= start < start + count <= total:
            raise ValueError(f"a prefill of tokens {start} .. {start + count - 1} of a {total}-token prompt")
        width = _aligned(total)
        self.reserve(width)
        self._forward = _Prefill(row, start, count, width)
        positions = torch.arange(start, start + count, device=self.device)
        masks = self._masks(positions, width)  # (count, width) each
        return positions.unsqueeze(0), {kind: mask[None, None] for kind, mask in masks.items()}

    def prefill_packed(self, chunks: list[PackedChunk], rows: int
                       ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Sets up one forward of several prompts' chunks, each at ``first .. first + count - 1`` of ``rows``
        packed rows (the rows between them are padding, never written to the KV); returns (position_ids
        (1, rows), padding at 0) and each chunk's masks as ``prefill`` gives them."""
        positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        masks = []
        for chunk in chunks:
            chunk_positions, chunk_masks = self.prefill(chunk.row, chunk.start, chunk.count, chunk.total)
            positions[chunk.first : chunk.first + chunk.count] = chunk_positions[0]
            masks.append(chunk_masks)
        self._forward = _Packed(tuple(chunks))
        return positions.unsqueeze(0), masks

    def row_kv(self, layer: int, row: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's keys and values of one layer, (1, kv_heads, width, head_dim) each: what a chunk of a
        packed prefill attends over."""
        return self._keys[layer, row : row + 1, :, :width], self._values[layer, row : row + 1, :, :width]

    def decode(self, lengths: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sets up one token for each of rows ``0 .. len(lengths) - 1``, where row ``r`` holds ``lengths[r]``;
        returns (position_ids, masks): a 4-D boolean mask (B, 1, 1, width) for each layer type."""
        width = _aligned(max(lengths) + 1)
        self.reserve(width)
        positions = torch.tensor(lengths, device=self.device)
        self._forward = _Decode(torch.arange(len(lengths), device=self.device), positions, width)
        masks = self._masks(positions, width)  # (B, width) each
        return positions.unsqueeze(1), {kind: mask[:, None, None, :] for kind, mask in masks.items()}

    def _masks(self, positions: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
        """For each layer type, (len(positions), width): which columns each position attends to."""
        columns = torch.arange(width, device=self.device).unsqueeze(0)
        causal = columns <= positions.unsqueeze(1)
        return {kind: causal if window is None else causal & (columns > positions.unsqueeze(1) - window)
                for kind, window in self.windows.items()}

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, **_
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by each attention layer with the new tokens' (B, kv_heads, n, head_dim)."""
        all_keys, all_values = self._keys[layer_idx], self._values[layer_idx]
        forward = self._forward
        if isinstance(forward, _Packed):  # each chunk's rows to its own row; attention reads them with row_kv
            for chunk in forward.chunks:
                rows = slice(chunk.first, chunk.first + chunk.count)
                all_keys[chunk.row, :, chunk.start : chunk.start + chunk.count] = keys[0, :, rows]
                all_values[chunk.row, :, chunk.start : chunk.start + chunk.count] = values[0, :, rows]
            return keys, values
        if isinstance(forward, _Prefill):
            row, start, end = forward.row, forward.start, forward.start + forward.count
            all_keys[row, :, start:end] = keys[0]
            all_values[row, :, start:end] = values[0]
            return all_keys[row : row + 1, :, : forward.width], all_values[row : row + 1, :, : forward.width]
        batch = forward.rows.shape[0]  # the decoding rows 0 .. B - 1
        all_keys[forward.rows, :, forward.positions] = keys[:, :, 0]
        all_values[forward.rows, :, forward.positions] = values[:, :, 0]
        return all_keys[:batch, :, : forward.width], all_values[:batch, :, : forward.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # transformers asks when given no position ids
        raise RuntimeError("SlotKV forwards always pass position ids")


class _Prefill:
    __slots__ = ("count", "row", "start", "width")

    def __init__(self, row: int, start: int, count: int, width: int):
        self.row, self.start, self.count, self.width = row, start, count, width


class PackedChunk(NamedTuple):
    """One prompt's chunk in a packed prefill: tokens ``start .. start + count - 1`` of a ``total``-token
    prompt, going to KV row ``row``, at packed rows ``first ..``."""
    row: int
    start: int
    count: int
    total: int
    first: int


class _Packed:
    __slots__ = ("chunks",)

    def __init__(self, chunks: tuple[PackedChunk, ...]):
        self.chunks = chunks


class _Decode:
    __slots__ = ("positions", "rows", "width")

    def __init__(self, rows: torch.Tensor, positions: torch.Tensor, width: int):
        self.rows, self.positions, self.width = rows, positions, width
