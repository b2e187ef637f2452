"""Weights and kernels for CPU inference, chosen so that a row's bits never depend on the batch.

Decode computes one token per running sequence: a few rows against every weight
of the model, so it is bound by reading the weights and wants the fewest bytes
per weight. Prefill computes a whole prompt, many rows against the same weights,
so it is bound by arithmetic and wants a blocked GEMM that reuses each weight
across rows. Hence each ``nn.Linear`` becomes a ``DecodeLinear`` holding

- the decode weights: int8 with one scale per output channel (symmetric,
  absmax / 127), read by ``torch._weight_int8pack_mm``, or bfloat16, read by
  ``F.linear``; both with bfloat16 activations. These kernels compute each row
  on its own, so a row gives the same bits alone or in a batch;
- the same weights widened exactly to float32, for prefill: float32 GEMM
  (MKL sgemm) is the one that blocks well on every x86 CPU torch runs on, while
  a bfloat16 GEMM is fast only where the CPU has AVX-512 BF16 or AMX. The
  float32 copy holds the values the decode kernel dequantizes (int4's kernel may
  round its dequantization its own way, by an ulp; prefill and decode are never
  compared bit for bit).

In ``float32`` (the reference precision) the weights stay as loaded, and decode
goes through the float32 GEMM too: MKL picks its sgemm kernel from the row
count, so there is no float32 kernel whose rows are independent of the batch;
one fixed 16-row tile per step is.

Every prefill GEMM runs in fixed tiles of ``GEMM_TILE_ROWS`` rows, all tiles one
batched call (services/inference/tiles.py): a row's bits then do not depend on
how many rows come with it, so a prompt's tail after a reused prefix comes out
as in a cold prefill. This costs prefill some speed (MKL reads the weights once
per tile rather than once per call); a single GEMM over all rows does not keep
rows independent, as MKL picks kernel and threading from the row count and
CPUs differ in where that changes the rounding. Prefill attention is tiled the
same way (services/inference/attention.py). The output layer is the exception:
in prefill it sees the last position only, one row whether or not a prefix was
reused, so it takes the decode kernel.

Machines differ: an AVX2-only CPU and one with AVX-512 BF16/VNNI and AMX run
different code inside the same torch call (services/inference/cpu_features.py).
So the engine does not take row independence on trust: at start,
``check_row_independence`` runs the model's own layer shapes through the decode
kernels and the tiled GEMM, and a precision whose kernels fail it on this CPU is
refused with a ValueError that names it.

Why not torchao for int8: its weight-only tensor subclass calls the same kernel,
but its eager dispatch costs more than the multiply itself at one row, and under
``torch.compile`` every batch shape compiles anew.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from services.inference.attention import tiled_sdpa_attention, use_tiled_attention
from services.inference.cpu_features import CpuFeatures
from services.inference.tiles import (
    BY_POSITION,
    FROM_START,
    GEMM_TILE_ROWS,
    TILE_ROWS,
    in_prefill,
    placed,
    prefill_phase,
    tile_count,
    tile_offset,
)

__all__ = ["FASTEST_FIRST", "MAX_DECODE_ROWS", "PLACEMENT_NOTES", "PRECISIONS", "TILE_ROWS", "DecodeLinear",
           "RowDependence", "apply_fastest_precision", "apply_precision", "check_row_independence",
           "choose_one_tile_parts", "choose_tile_placement", "kernel_paths", "model_precision", "prefill_phase",
           "set_gemm_rows", "set_one_tile_parts", "side_by_side"]

log = logging.getLogger("nlpmesh.inference")

# Decode steps have at most this many rows (InferenceSettings caps max_running):
# in float32, one tile. A forward with more rows, or any forward under
# ``prefill_phase()``, takes the tiled float32 GEMM.
MAX_DECODE_ROWS = TILE_ROWS

PRECISIONS = ("int8", "int4", "bfloat16", "float32")
# ``auto`` (the default) takes the first of these whose kernels keep a row's bits independent of the
# batch on this CPU: decode reads every weight once a token, so the fewest bytes first. Each is within
# the perplexity guard (tests/unit/test_inference_precision.py).
FASTEST_FIRST = ("int4", "int8", "bfloat16", "float32")

# int4: each group of this many input weights of an output row has its own scale and
# offset (llama.cpp's Q4_1 block); torch's CPU int4pack layout needs output rows by 16.
INT4_GROUP = 32
INT4_ROW_MULTIPLE = 16

_DECODE_KERNELS = {
    "int8": "torch._weight_int8pack_mm per row",
    "int4": f"torch._weight_int4pack_mm_for_cpu per row ({INT4_GROUP}-weight groups; the output layer int8)",
    "bfloat16": "bfloat16 F.linear per row",
    "float32": f"float32 GEMM in one {TILE_ROWS}-row tile",
}


class RowDependence(ValueError):
    """A precision's kernels give a row different bits depending on the rows beside it, on this CPU."""


class DecodeLinear(nn.Module):
    def __init__(self, linear: nn.Linear, precision: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.precision = precision
        self.gemm_rows = MAX_DECODE_ROWS + 1
        self.one_tile_parts = 1  # a one-tile prefill GEMM in this many parts (``set_one_tile_parts``)
        # False for the output layer: in prefill it sees the last position only, one row in a
        # cold prefill as after a prefix hit, so the decode kernel serves it.
        self.tiled_prefill = True
        if precision == "float32":
            wide = linear.weight.detach().float()  # shares a tied weight's storage
        else:
            weight = linear.weight.detach().float()
            if precision == "int8":
                scales = (weight.abs().amax(dim=1).clamp(min=1e-8) / 127).to(torch.bfloat16)
                self.register_buffer("weight_int8", torch.round(weight / scales.float()[:, None]).clamp(-127, 127)
                                     .to(torch.int8))
                self.register_buffer("scales", scales)
                wide = self.weight_int8.float() * scales.float()[:, None]
            elif precision == "int4":
                wide = self._quantize_int4(weight)
            elif precision == "bfloat16":
                self.register_buffer("weight", weight.to(torch.bfloat16))
                wide = self.weight.float()
            else:
                raise ValueError(f"unknown decode precision {precision!r}")
        self.register_buffer("weight_float32", wide, persistent=False)
        bias = linear.bias
        bias_dtype = torch.float32 if precision == "float32" else torch.bfloat16
        self.register_buffer("bias", None if bias is None else bias.detach().to(bias_dtype))

    def _quantize_int4(self, weight: torch.Tensor) -> torch.Tensor:
        """Registers the int4 weights in torch's CPU int4pack layout (groups of ``INT4_GROUP`` input weights,
        each a bfloat16 scale and offset: w = (q - 8) * scale + zero, so q = 0 is the group's minimum and
        15 its maximum, llama.cpp's Q4_1 grid) and returns them widened exactly to float32."""
        rows, columns = weight.shape
        if columns % INT4_GROUP or rows % INT4_ROW_MULTIPLE:
            raise ValueError(f"precision int4 needs a layer's inputs in whole groups of {INT4_GROUP} and its outputs "
                             f"a multiple of {INT4_ROW_MULTIPLE}; a {columns}->{rows} layer has not")
        groups = weight.view(rows, columns // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16)
        zero = (low + 8 * scale.float()).to(torch.bfloat16)
        codes = torch.round((groups - (zero.float() - 8 * scale.float())[..., None]) / scale.float()[..., None])
        codes = codes.clamp(0, 15).to(torch.int32)
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(codes.view(rows, columns), 1))
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        return ((codes.float() - 8) * scale.float()[..., None] + zero.float()[..., None]).view(rows, columns)

    def int4_codes(self) -> torch.Tensor:
        """The int4 codes (out, in) as int32, from the float32 copy: each is (w - zero) / scale + 8 exactly."""
        scale, zero = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out, groups) each
        rows, columns = self.weight_float32.shape
        groups = self.weight_float32.view(rows, columns // INT4_GROUP, INT4_GROUP)
        codes = torch.round((groups - zero[..., None]) / scale[..., None]) + 8
        return codes.clamp(0, 15).to(torch.int32).view(rows, columns)

    @property
    def activation_dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "float32" else torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        if rows >= self.gemm_rows or (in_prefill() and self.tiled_prefill):
            out = tiled_gemm(flat, self.weight_float32, self.bias, GEMM_TILE_ROWS, self.one_tile_parts).to(x.dtype)
        else:
            out = self.decode_rows(flat)
        return out.reshape(*x.shape[:-1], self.out_features)

    def decode_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """A decode step's rows (at most ``MAX_DECODE_ROWS``, (rows, in) -> (rows, out)) through the
        decode kernel; ``forward`` outside prefill, and the engine's own decode step
        (services/inference/decode_step.py)."""
        if self.precision == "float32":  # one tile
            return tiled_gemm(flat, self.weight_float32, self.bias, TILE_ROWS)
        if self.precision == "bfloat16":
            return F.linear(flat, self.weight, self.bias)
        if self.precision == "int4":
            out = torch._weight_int4pack_mm_for_cpu(flat, self.weight_int4, INT4_GROUP, self.scales_and_zeros)
            return out if self.bias is None else out + self.bias
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        return out if self.bias is None else out + self.bias


# The decode buffers that run along a layer's outputs, with the dimension they run along.
_OUTPUT_BUFFERS = {"int8": (("weight_int8", 0), ("scales", 0)), "int4": (("weight_int4", 0), ("scales_and_zeros", 1)),
                   "bfloat16": (("weight", 0),)}


def side_by_side(linears: list[DecodeLinear]) -> DecodeLinear | None:
    """One decode layer computing the outputs of ``linears`` (the same inputs, no bias) side by side in
    one kernel call: q, k and v, or gate and up. None where that would not give every output the very
    bits of its own layer on this CPU (checked on random rows, at every decode batch size) or the
    precision has no such kernel (float32 decodes through the tiled GEMM, whose bits may depend on the
    output count). Decode only: it holds no float32 copy for prefill. Its weights are a copy (for
    SmolLM2-135M, q/k/v and gate/up: 70 MB in int8, 44 MB in int4 with its scales and offsets)."""
    first = linears[0]
    buffers = _OUTPUT_BUFFERS.get(first.precision)
    if buffers is None or any(linear.precision != first.precision or linear.in_features != first.in_features
                              or linear.bias is not None for linear in linears):
        return None
    joined = DecodeLinear.__new__(DecodeLinear)
    nn.Module.__init__(joined)
    joined.in_features, joined.out_features = first.in_features, sum(linear.out_features for linear in linears)
    joined.precision, joined.gemm_rows, joined.tiled_prefill = first.precision, first.gemm_rows, False
    for name, dim in buffers:
        if name == "weight_int4":  # packed in blocks of output rows: join the codes, pack once
            codes = torch.cat([linear.int4_codes() for linear in linears])
            joined.register_buffer(name, torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        else:
            joined.register_buffer(name, torch.cat([getattr(linear, name) for linear in linears], dim=dim).contiguous())
    joined.register_buffer("bias", None)
    joined.register_buffer("weight_float32", None, persistent=False)
    x = torch.randn(MAX_DECODE_ROWS, first.in_features, generator=torch.Generator().manual_seed(2))
    x = x.to(first.activation_dtype)
    with torch.inference_mode():
        for rows in range(1, MAX_DECODE_ROWS + 1):
            own = torch.cat([linear.decode_rows(x[:rows]) for linear in linears], dim=1)
            if not torch.equal(joined.decode_rows(x[:rows]), own):
                return None
    return joined


def tiled_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile_rows: int,
               parts: int = 1) -> torch.Tensor:
    """``x @ weight.T + bias`` in float32, (rows, in) -> (rows, out), as one batched multiply of
    ``tile_rows``-row tiles, the rows placed as ``tiles.tile_offset`` says; a single tile in ``parts``
    multiplies of a share of the outputs each (``choose_one_tile_parts``)."""
    rows, columns = x.shape
    offset = tile_offset(tile_rows)
    tiles = tile_count(offset, rows, tile_rows)
    if offset == 0 and rows == tiles * tile_rows:  # whole tiles: nothing to pad
        padded = x.to(torch.float32)
    else:
        padded = x.new_zeros(tiles * tile_rows, columns, dtype=torch.float32)
        padded[offset : offset + rows] = x
    if tiles == 1 and parts > 1 and weight.shape[0] % parts == 0:
        out = _one_tile_in_parts(padded, weight, parts)
    else:
        transposed = weight.t()
        out = torch.bmm(padded.view(tiles, tile_rows, columns), transposed.expand(tiles, *transposed.shape))
    out = out.view(tiles * tile_rows, -1)[offset : offset + rows]
    return out if bias is None else out + bias.float()


# A prefill of one tile (a prefix hit's tail; a chunk beside decoding streams) is a skinny multiply
# bound by reading the weights, and MKL reads them for one multiply slower than one thread each
# for ``parts`` multiplies of a share of the outputs (measured on AVX-512: a 32-row tile through
# SmolLM2's layers 10% faster in 2 parts). Set per model by the engine at start where each part's
# outputs are checked to have the very bits of the whole multiply (``choose_one_tile_parts``).
# Prefill GEMM tiles only: the float32 decode tile and the output layer are never split.


def _one_tile_in_parts(tile: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    """One tile (rows, in) @ weight.T as ``parts`` batch items, each a share of the outputs."""
    rows, columns = tile.shape
    shares = weight.view(parts, weight.shape[0] // parts, columns).transpose(1, 2)
    return torch.bmm(tile.expand(parts, rows, columns), shares).transpose(0, 1).reshape(rows, -1)


def set_one_tile_parts(model: nn.Module, parts: int) -> None:
    """A one-tile prefill GEMM of ``model``'s layers in ``parts`` multiplies (1: one)."""
    for module in model.modules():
        if isinstance(module, DecodeLinear):
            module.one_tile_parts = max(parts, 1)


def choose_one_tile_parts(model: nn.Module, threads: int) -> int:
    """``threads`` where every prefill GEMM shape of ``model`` gives a one-tile multiply split in that
    many parts the very bits of the whole multiply on this CPU (and there are 2 threads or more), else 1."""
    if threads < 2:
        return 1
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for layer in _layers_by_shape(model):
            if not layer.tiled_prefill or layer.out_features % threads:
                continue
            tile = torch.randn(GEMM_TILE_ROWS, layer.in_features, generator=generator)
            whole = torch.bmm(tile[None], layer.weight_float32.t()[None])[0]
            if not torch.equal(_one_tile_in_parts(tile, layer.weight_float32, threads), whole):
                return 1
    return threads


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """Puts ``model`` in ``precision``: every ``nn.Linear`` (lm_head included) becomes a
    ``DecodeLinear``; in bfloat16, int8 and int4 the rest (embeddings, norms, activations,
    KV cache) goes to bfloat16, in float32 it stays float32. In int4 the output layer is
    int8: its error lands straight on the logits (int4 there measured +6.5% perplexity,
    against +0.4% for int4 everywhere else). A transformers model also gets the tiled
    prefill attention."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        model = model.float()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                own = "int8" if precision == "int4" and child is output else precision
                setattr(module, name, DecodeLinear(child, own))
    if precision != "float32":
        for module in model.modules():  # the other weights; buffers (RoPE frequencies) stay as they are
            if not isinstance(module, DecodeLinear):
                for parameter in module.parameters(recurse=False):
                    parameter.data = parameter.data.to(torch.bfloat16)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(output, DecodeLinear):
        output.tiled_prefill = False
    use_tiled_attention(model)
    return model


def apply_fastest_precision(load: Callable[[], nn.Module], features: CpuFeatures) -> nn.Module:
    """``auto``: the model from ``load()`` in the first precision of ``FASTEST_FIRST`` whose kernels pass
    ``check_row_independence`` on this CPU (for the largest decode batch), each refusal and the choice
    logged. Loads again after a refusal (``apply_precision`` converts in place)."""
    refusals = []
    for precision in FASTEST_FIRST:
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
                        f"({features.summary()}); tried {', '.join(FASTEST_FIRST)}")


def set_gemm_rows(model: nn.Module, rows: int) -> None:
    """Changes the float32 GEMM threshold (a test sets it out of reach to measure the decode kernels)."""
    for module in model.modules():
        if isinstance(module, DecodeLinear):
            module.gemm_rows = rows


def _layers_by_shape(model: nn.Module) -> list[DecodeLinear]:
    layers: dict[tuple[int, int], DecodeLinear] = {}
    for module in model.modules():
        if isinstance(module, DecodeLinear):
            layers.setdefault((module.in_features, module.out_features), module)
    return list(layers.values())


def model_precision(model: nn.Module) -> str | None:
    """The precision ``apply_precision`` gave ``model``; None for a model it did not touch."""
    layers = _layers_by_shape(model)
    return layers[0].precision if layers else None


def kernel_paths(model: nn.Module) -> str:
    """One line naming the kernels ``model`` runs (for the engine's start-up log)."""
    precision = model_precision(model)
    if precision is None:
        return "the model's own linear layers (no DecodeLinear)"
    return (f"{precision}: decode {_DECODE_KERNELS[precision]}; prefill float32 GEMM in {GEMM_TILE_ROWS}-row tiles; "
            f"prefill attention in {TILE_ROWS}-query tiles")


def check_row_independence(model: nn.Module, batch_rows: int, features: CpuFeatures) -> None:
    """Raises ``RowDependence`` unless, on this CPU, each distinct layer shape of ``model`` gives a row

    - the same bits in a decode step of ``batch_rows`` rows (and of 2) as alone, and
    - the same bits in a prefill whatever rows precede it (a tail after a reused prefix);
      the output layer, which sees one row in any prefill, is exempt.

    Runs on random inputs, in a fraction of a second for SmolLM2-135M.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(), placed(BY_POSITION):
        for layer in _layers_by_shape(model):
            name = f"{layer.in_features}->{layer.out_features}"
            x = torch.randn(3 * GEMM_TILE_ROWS, layer.in_features, generator=generator).to(layer.activation_dtype)
            alone = torch.cat([layer(x[row : row + 1]) for row in range(batch_rows)])
            for count in sorted({2, batch_rows}):
                if count <= batch_rows and not torch.equal(layer(x[:count]), alone[:count]):
                    raise RowDependence(
                        f"precision {layer.precision} cannot keep greedy output independent of the batch on this CPU "
                        f"({features.summary()}): its decode kernel ({_DECODE_KERNELS[layer.precision]}) gives a "
                        f"{name} layer's rows different bits in a batch of {count} than alone; choose another "
                        f"NLPMESH_INFERENCE_DTYPE")
            if not layer.tiled_prefill:  # the output layer: one row in any prefill
                continue
            starts = (TILE_ROWS, GEMM_TILE_ROWS, 3 * GEMM_TILE_ROWS // 2 + 3, x.shape[0] - 1)
            if (start := _first_tail_unlike_whole(layer, x, starts)) is not None:
                raise RowDependence(
                    f"precision {layer.precision} cannot keep a prefix-cache hit equal to a cold prefill on "
                    f"this CPU ({features.summary()}): the tiled float32 GEMM gives a {name} layer's rows "
                    f"from {start} on different bits than in the whole prompt")


def _first_tail_unlike_whole(layer: DecodeLinear, x: torch.Tensor, starts: tuple[int, ...]) -> int | None:
    """The first of ``starts`` from which a prefill of ``x``'s rows (under the current placement) gives
    other bits than the prefill of all of ``x``; None when every tail matches."""
    with prefill_phase(0):
        whole = layer(x)
    for start in starts:
        with prefill_phase(start):
            if not torch.equal(layer(x[start:]), whole[start:]):
                return start
    return None


PLACEMENT_NOTES = {
    FROM_START: "rows placed from each prefill's first row (checked: a row's bits do not depend on its place "
                "in a tile here)",
    BY_POSITION: "rows placed by absolute position (a row's bits depend on its place in a tile here)",
}


def choose_tile_placement(model: nn.Module) -> str:
    """``FROM_START`` where, on this CPU, every distinct prefill GEMM shape of ``model`` and its tiled
    attention give a prompt's rows the same bits when a prefill starts at any token (its rows then
    sit elsewhere in their tiles, and in fewer tiles) as in a prefill of the whole prompt; else
    ``BY_POSITION``, which needs no such luck (``check_row_independence`` has checked it)."""
    generator = torch.Generator().manual_seed(1)
    starts = (1, TILE_ROWS - 3, GEMM_TILE_ROWS + 5, 2 * GEMM_TILE_ROWS + 13, 3 * GEMM_TILE_ROWS - 1)
    with torch.inference_mode(), placed(FROM_START):
        for layer in _layers_by_shape(model):
            if not layer.tiled_prefill:
                continue
            x = torch.randn(3 * GEMM_TILE_ROWS, layer.in_features, generator=generator).to(layer.activation_dtype)
            if _first_tail_unlike_whole(layer, x, starts) is not None:
                return BY_POSITION
        attention = _attention_shapes(model)
        if attention is not None:
            heads, kv_heads, head_dim, dtype = attention
            rows = 3 * GEMM_TILE_ROWS
            width = rows + 2 * TILE_ROWS  # the aligned width of a longer prompt: columns past each row masked
            query = torch.randn(1, heads, rows, head_dim, generator=generator).to(dtype)
            key, value = (torch.randn(1, kv_heads, width, head_dim, generator=generator).to(dtype) for _ in range(2))
            mask = torch.arange(width)[None, :] <= torch.arange(rows)[:, None]
            with prefill_phase(0):
                whole, _ = tiled_sdpa_attention(None, query, key, value, mask[None, None])
            for start in starts:
                with prefill_phase(start):
                    tail, _ = tiled_sdpa_attention(None, query[:, :, start:], key, value, mask[None, None, start:])
                if not torch.equal(tail, whole[:, start:]):
                    return BY_POSITION
    return FROM_START


def _attention_shapes(model: nn.Module) -> tuple[int, int, int, torch.dtype] | None:
    """(heads, kv heads, head dim, activation dtype) of a transformers model; None for another module."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = model.get_input_embeddings().weight.dtype
    return config.num_attention_heads, config.num_key_value_heads, head_dim, dtype
