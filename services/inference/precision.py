"""Weights for fast CPU decode: bfloat16 or int8, with a float32 GEMM for prefill.

Measured on this machine's CPU (AVX2, no AVX-512), torch 2.13, a 576 -> 1536 layer:

    rows (tokens)          1        8        300
    float32 F.linear     0.08 ms  0.29 ms   4 ms     (MKL sgemm: batches well)
    bfloat16 F.linear    0.10 ms  0.78 ms  32 ms     (one GEMV per row)
    int8 weight-only     0.09 ms  0.27 ms  10 ms     (torch._weight_int8pack_mm, one pass per row)

Decode is bound by reading the weights, so it wants the fewest bytes per weight;
prefill is bound by arithmetic, and only float32 sgemm is fast at it here. So
each ``nn.Linear`` becomes a ``DecodeLinear`` holding:
- the decode weights: bfloat16, or int8 with one scale per output channel
  (symmetric, absmax / 127), read by torch's own kernels with bfloat16 activations;
- the same weights widened exactly to float32, for forwards of more than
  ``MAX_DECODE_ROWS`` rows (prefill): the float32 copy holds the very values the decode kernel uses.

Both decode kernels compute every row on its own, so a row's result does not
depend on how many other rows share the step (tests/unit/test_inference_precision.py).

Why not torchao for int8: its weight-only tensor subclass calls the same kernel,
but its dispatch in eager mode costs more than the matmul at one row (14.5 tok/s
against 23 for bfloat16), and under ``torch.compile`` every batch shape compiles
for about 50 s.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Decode steps have at most this many rows (InferenceSettings caps max_running);
# a forward with more rows, or any forward under ``prefill_phase()``, takes the
# float32 GEMM.
MAX_DECODE_ROWS = 16
MIN_GEMM_ROWS = 8
_phase = threading.local()


@contextmanager
def prefill_phase() -> Iterator[None]:
    """Forwards in this block (on this thread) take the float32 GEMM, whatever their row count.

    The engine prefills under it, so a prompt's tail takes the same path whether
    the part before it came from the prefix cache or not. MKL's sgemm gives a row
    the same bits whatever the row count from 4 rows up (measured for every layer
    shape here: 1 and 2 rows take another kernel), so the GEMM never runs on fewer
    than ``MIN_GEMM_ROWS`` rows: shorter inputs are padded with zero rows.
    """
    _phase.prefill = True
    try:
        yield
    finally:
        _phase.prefill = False


PRECISIONS = ("int8", "bfloat16", "float32")


class DecodeLinear(nn.Module):
    def __init__(self, linear: nn.Linear, precision: str):
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.precision = precision
        self.gemm_rows = MAX_DECODE_ROWS + 1
        if precision == "int8":
            scales = (weight.abs().amax(dim=1).clamp(min=1e-8) / 127).to(torch.bfloat16)
            self.register_buffer("weight_int8", torch.round(weight / scales.float()[:, None]).clamp(-127, 127)
                                 .to(torch.int8))
            self.register_buffer("scales", scales)
            wide = self.weight_int8.float() * scales.float()[:, None]
        elif precision == "bfloat16":
            self.register_buffer("weight", weight.to(torch.bfloat16))
            wide = self.weight.float()
        else:
            raise ValueError(f"unknown decode precision {precision!r}")
        self.register_buffer("weight_float32", wide, persistent=False)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= self.gemm_rows or getattr(_phase, "prefill", False):
            return self._gemm(x, rows)
        if self.precision == "bfloat16":
            return F.linear(x, self.weight, self.bias)
        flat = torch._weight_int8pack_mm(x.reshape(rows, self.in_features), self.weight_int8, self.scales)
        if self.bias is not None:
            flat = flat + self.bias
        return flat.reshape(*x.shape[:-1], self.out_features)

    def _gemm(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        flat = x.reshape(rows, self.in_features).float()
        if rows < MIN_GEMM_ROWS:
            flat = torch.cat((flat, flat.new_zeros(MIN_GEMM_ROWS - rows, self.in_features)))
        bias = None if self.bias is None else self.bias.float()
        out = F.linear(flat, self.weight_float32, bias)[:rows]
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """Puts ``model`` in ``precision``: float32 leaves it as it is; bfloat16 and int8
    replace every ``nn.Linear`` (lm_head included) by a ``DecodeLinear`` and keep
    the rest (embeddings, norms, activations, KV cache) in bfloat16."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return model.float()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, DecodeLinear(child, precision))
    for module in model.modules():  # the other weights; buffers (RoPE frequencies) stay as they are
        if not isinstance(module, DecodeLinear):
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.to(torch.bfloat16)
    return model


def set_gemm_rows(model: nn.Module, rows: int) -> None:
    """Changes the float32 GEMM threshold (a test sets it out of reach to measure the decode kernels)."""
    for module in model.modules():
        if isinstance(module, DecodeLinear):
            module.gemm_rows = rows
