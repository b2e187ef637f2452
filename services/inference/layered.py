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
"""
from __future__ import annotations

import torch
from transformers import PreTrainedModel

from services.inference.decode_step import decoder_layer, unsqueezed
from services.inference.families import family_of, layer_types
from services.inference.kernel_plan import kernel_plan
from services.inference.kv import SlotKV
from services.inference.tiles import GEMM_TILE_ROWS, tile_count


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
