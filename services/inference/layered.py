"""One prefill chunk's forward, run a group of decoder layers at a time.

A chunk's smallest unit of work is one GEMM tile (services/inference/tiles.py),
and on a CPU a tile through the whole model costs several decode steps (it
reads the float32 prefill weights once). To keep a running stream's gap between
tokens short, the engine may run a chunk's layers over several turns, a decode
step between two groups: the chunk's hidden states wait between turns, and its
KV row is not part of the decode steps meanwhile.

The layers are the model's own modules called as its own forward calls them
(embeddings, rotary embeddings, each decoder layer, the final norm, the output
layer on the last position), so a chunk run in groups gives the very bits of
one forward; tests/integration/test_inference_real_model.py checks that on the real
model. Each layer gets its type's rotary embedding and mask (full or sliding-window
attention) as the family's rule says (services/inference/families.py).

``PackedForward`` prefills chunks of several prompts in one forward (a burst is
prefilled as a batch, not one prompt after another). Placed by position, each
chunk keeps its own GEMM tiles, laid out as a prefill of it alone lays them out
(its first row where the placement puts it, padding rows around it); placed from
the start, where a row's bits are checked not to depend on its place in a tile,
the chunks follow each other and share tiles (no padding between them). The
tiles of all chunks go through each linear layer as one batched multiply; every
tile is the same multiply however many there are (services/inference/tiles.py), each chunk gets its
own rotary embedding, and attends over its own KV row in its own query tiles. The
last decoder layer, which computes the prompt's last row only, runs for each
chunk alone as ``ChunkForward`` runs it. So a chunk packed with others gets the
very bits of its prefill alone (tests/integration/test_inference_packed_prefill.py).
"""
from __future__ import annotations

import functools

import torch
from transformers import PreTrainedModel

from services.inference.attention import prefill_attention
from services.inference.decode_step import decoder_layer, unsqueezed
from services.inference.families import family_of, layer_types
from services.inference.kernel_plan import kernel_plan
from services.inference.kv import PackedChunk, SlotKV
from services.inference.tiles import FROM_START, GEMM_TILE_ROWS, TILE_ROWS, first_row, tile_count


class ChunkForward:
    def __init__(self, model: PreTrainedModel, kv: SlotKV, prompt: list[int], start: int, end: int, *,
                 unwrapped: bool = False):
        """``unwrapped``: run each decoder layer through ``decode_step.decoder_layer`` (the layer's own
        operations without transformers' wrappers, the same bits) rather than its forward."""
        self.start, self.end, self.total = start, end, len(prompt)
        self._unwrapped = unwrapped
        self._model, self._base, self._kv = model, model.base_model, kv
        self._family, self._kinds = family_of(model.config), layer_types(model.config)
        self._plan = kernel_plan(model)  # the model's: its layers read the phase and the placement from it
        self._ids = prompt[start:end]
        self.layer = 0  # the next decoder layer to run
        self.layer_count = len(self._base.layers)
        self._hidden: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.layer == self.layer_count

    @property
    def cost_tokens(self) -> int:
        """What the chunk costs through all layers, in tokens: its GEMM tiles' rows (a tile costs
        the same however many of its rows are the prompt's)."""
        first_row = self._plan.first_row(self.start, GEMM_TILE_ROWS)
        return tile_count(first_row, self.end - self.start, GEMM_TILE_ROWS) * GEMM_TILE_ROWS

    def resume(self, hidden: torch.Tensor, layer: int) -> None:
        """Goes on from ``layer`` with ``hidden`` (1, n, hidden size), the chunk's rows as a packed
        forward of the layers before left them."""
        self._hidden, self.layer = hidden, layer

    @property
    def token_ids(self) -> list[int]:
        """The chunk's prompt tokens."""
        return self._ids

    def run(self, row: int, layers: int) -> torch.Tensor | None:
        """Runs the next ``layers`` decoder layers with the chunk's KV going to ``row``. Returns the last
        position's logits (1, 1, vocab) once the prompt's last chunk has run all layers, else None."""
        positions, masks = self._kv.prefill(row, self.start, self.end - self.start, self.total)
        base, family, kinds = self._base, self._family, self._kinds
        with self._plan.prefill(self.start):
            if self._hidden is None:
                self._hidden = base.embed_tokens(torch.tensor([self._ids], device=positions.device))
            rotary = family.rotary(base, self._hidden, positions)
            stop = min(self.layer + layers, self.layer_count)
            if self._unwrapped:
                rotary = unsqueezed(rotary)
                last = self.layer_count - 1
                for index in range(self.layer, stop):
                    # The last layer's output feeds the logits only: the prompt's last row, or none before.
                    outputs = None if index < last else (1 if self.end == self.total else 0)
                    kind = kinds[index]
                    self._hidden = decoder_layer(base.layers[index], index, self._hidden, rotary[kind], masks[kind],
                                                 self._kv, self._plan, family, decode=False, outputs=outputs)
            else:
                for index in range(self.layer, stop):
                    kind = kinds[index]
                    self._hidden = base.layers[index](self._hidden, attention_mask=masks[kind],
                                                      position_embeddings=rotary[kind], position_ids=positions,
                                                      cache=self._kv, use_cache=True)
            self.layer = stop
            if not self.done or self.end < self.total:
                return None
            hidden = base.norm(self._hidden)
            return family.logits(self._model.config, self._model.get_output_embeddings()(hidden[:, -1:, :]))


class PackedForward:
    """Chunks of several prompts (``ChunkForward``s, each of its own KV row, none started) run as one
    forward, a group of decoder layers at a time. One chunk alone runs as itself."""

    def __init__(self, model: PreTrainedModel, kv: SlotKV, chunks: list[ChunkForward]):
        if not chunks:
            raise ValueError("a packed prefill needs a chunk")
        self.chunks = chunks
        self._model, self._base, self._kv = model, model.base_model, kv
        self._family, self._kinds = family_of(model.config), layer_types(model.config)
        self._plan = kernel_plan(model)
        self.layer = 0
        self.layer_count = chunks[0].layer_count
        # Where each chunk's first row goes. Placed from the start (a row's bits checked not to depend on its
        # place in a tile), each chunk right after the previous one, tiles shared; by position, each in
        # tiles of its own as its prefill alone places it.
        self._firsts, rows = [], 0
        for chunk in chunks:
            if self._plan.placement == FROM_START:
                self._firsts.append(rows)
                rows += chunk.end - chunk.start
            else:
                self._firsts.append(rows + self._plan.first_row(chunk.start, GEMM_TILE_ROWS))
                rows += chunk.cost_tokens
        self._rows = -(-rows // GEMM_TILE_ROWS) * GEMM_TILE_ROWS
        self._hidden: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.layer == self.layer_count

    @property
    def cost_tokens(self) -> int:
        """What the forward costs through all layers, in tokens: all its chunks' GEMM tiles' rows."""
        return self._rows

    def run(self, rows: list[int], layers: int) -> list[torch.Tensor | None]:
        """Runs the next ``layers`` decoder layers, chunk ``i``'s KV going to KV row ``rows[i]``. Once all
        layers have run, each chunk's last logits (1, 1, vocab) where it ends its prompt, else None."""
        if len(self.chunks) == 1:
            logits = self.chunks[0].run(rows[0], layers)
            self.layer = self.chunks[0].layer
            return [logits]
        stop = min(self.layer + layers, self.layer_count)
        packed_stop = min(stop, self.layer_count - 1)  # the last layer: each chunk alone
        if self.layer < packed_stop:
            self._run_packed(rows, packed_stop)
        if stop < self.layer_count:
            return [None] * len(self.chunks)
        logits = []
        for chunk, first, row in zip(self.chunks, self._firsts, rows):
            count = chunk.end - chunk.start
            chunk.resume(self._hidden[:, first : first + count], self.layer)
            logits.append(chunk.run(row, 1))
        self.layer, self._hidden = stop, None
        return logits

    def _run_packed(self, rows: list[int], stop: int) -> None:
        packed = [PackedChunk(row, chunk.start, chunk.end - chunk.start, chunk.total, first)
                  for chunk, first, row in zip(self.chunks, self._firsts, rows)]
        positions, masks = self._kv.prefill_packed(packed, self._rows)
        base, family, kinds = self._base, self._family, self._kinds
        with self._plan.prefill(0):  # whole tiles from row 0: each chunk's tiles as laid out above
            if self._hidden is None:
                ids = torch.zeros(self._rows, dtype=torch.long, device=positions.device)
                for chunk, first in zip(self.chunks, self._firsts):
                    ids[first : first + chunk.end - chunk.start] = torch.tensor(chunk.token_ids)
                self._hidden = base.embed_tokens(ids.unsqueeze(0))
            rotary = unsqueezed(self._rotary(positions, packed))
            attend = functools.partial(_packed_attention, self._kv, packed, self._plan.placement)
            for index in range(self.layer, stop):
                kind = kinds[index]
                self._hidden = decoder_layer(base.layers[index], index, self._hidden, rotary[kind],
                                             [chunk_masks[kind] for chunk_masks in masks], self._kv, self._plan,
                                             family, decode=False, attend=attend)
        self.layer = stop

    def _rotary(self, positions: torch.Tensor, packed: list[PackedChunk]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Each layer type's (cos, sin) for the packed rows, each chunk's computed as its prefill alone
        computes it (the same shape, so the same vector code for every element)."""
        rotary = {kind: tuple(torch.zeros(*positions.shape, part.shape[-1], dtype=part.dtype, device=part.device)
                              for part in parts)
                  for kind, parts in self._family.rotary(self._base, self._hidden, positions[:, :1]).items()}
        for chunk in packed:
            rows = slice(chunk.first, chunk.first + chunk.count)
            own = self._family.rotary(self._base, self._hidden, positions[:, rows])
            for kind, parts in own.items():
                for whole, part in zip(rotary[kind], parts):
                    whole[:, rows] = part
        return rotary


def _packed_attention(kv: SlotKV, packed: list[PackedChunk], placement: str, module, query: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor, masks: list[torch.Tensor], dropout: float = 0.0,
                      scaling: float | None = None) -> tuple[torch.Tensor, None]:
    """A packed prefill's attention: each chunk's queries (1, heads, n, dim) over its own KV row, in its own
    query tiles, as its prefill alone attends; the padding rows get zeros. Returns (1, rows, heads, dim)."""
    output = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
    for chunk, mask in zip(packed, masks):
        rows = slice(chunk.first, chunk.first + chunk.count)
        keys, values = kv.row_kv(module.layer_idx, chunk.row, mask.shape[-1])
        output[:, rows] = prefill_attention(query[:, :, rows], keys, values, mask,
                                            first_row(chunk.start, TILE_ROWS, placement), dropout, scaling)
    return output, None
