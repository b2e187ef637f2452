"""The engine's linear layer: a decode kernel that computes each row on its own, and a float32 copy for prefill.

Decode computes one token per running sequence: a few rows against every weight
of the model, so it is bound by reading the weights and wants the fewest bytes
per weight. Prefill computes a whole prompt, many rows against the same weights,
so it is bound by arithmetic and wants a blocked GEMM that reuses each weight
across rows. Hence each ``nn.Linear`` becomes a ``DecodeLinear`` holding

- the decode weights: int8 with one scale per output channel or int4 in groups
  (services/inference/quantize.py), or bfloat16 read by ``F.linear``; all with
  bfloat16 activations. These kernels compute each row on its own, so a row gives
  the same bits alone or in a batch;
- the same weights widened exactly to float32, for prefill's tiled GEMM
  (services/inference/tiled_gemm.py). The float32 copy holds the values the decode
  kernel dequantizes (int4's kernel may round its dequantization its own way, by
  an ulp; prefill and decode are never compared bit for bit).

In ``float32`` (the reference precision) the weights stay as loaded, and decode
goes through the float32 GEMM too: MKL picks its sgemm kernel from the row
count, so there is no float32 kernel whose rows are independent of the batch;
one fixed tile per step is.

Which path a forward takes is its model's ``KernelPlan``'s to say
(services/inference/kernel_plan.py): the tiled GEMM in a prefill, or for more
rows than any decode step has. The output layer is the exception: in prefill it
sees the last position only, one row whether or not a prefix was reused, so it
takes the decode kernel.

Why not torchao for int8: its weight-only tensor subclass calls the same kernel,
but its eager dispatch costs more than the multiply itself at one row, and under
``torch.compile`` every batch shape compiles anew.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.inference.kernel_plan import KernelPlan
from services.inference.quantize import INT4_GROUP, int4_codes, quantize_int4, quantize_int8
from services.inference.tiled_gemm import tiled_gemm
from services.inference.tiles import GEMM_TILE_ROWS, TILE_ROWS

DECODE_KERNELS = {
    "int8": "torch._weight_int8pack_mm per row",
    "int4": f"torch._weight_int4pack_mm_for_cpu per row ({INT4_GROUP}-weight groups; the output layer int8)",
    "bfloat16": "bfloat16 F.linear per row",
    "float32": f"float32 GEMM in one {TILE_ROWS}-row tile",
}


class DecodeKernel(nn.Module):
    """Weights in a decode precision and the kernel that reads them, each row on its own
    (``DecodeLinear``, and ``JoinedLinear`` for several layers' outputs in one call)."""

    precision: str
    in_features: int
    out_features: int

    @property
    def activation_dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "float32" else torch.bfloat16

    def decode_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """A decode step's rows (at most ``MAX_DECODE_ROWS``, (rows, in) -> (rows, out)) through the
        decode kernel; ``forward`` outside prefill, and the engine's own decode step
        (services/inference/decode_step.py)."""
        if self.precision == "float32":  # one tile
            return self.float32_tile(flat)
        if self.precision == "bfloat16":
            return F.linear(flat, self.weight, self.bias)
        if self.precision == "int4":
            out = torch._weight_int4pack_mm_for_cpu(flat, self.weight_int4, INT4_GROUP, self.scales_and_zeros)
            return out if self.bias is None else out + self.bias
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        return out if self.bias is None else out + self.bias

    def float32_tile(self, flat: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no float32 decode kernel")


class DecodeLinear(DecodeKernel):
    def __init__(self, linear: nn.Linear, precision: str, plan: KernelPlan):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.precision = precision
        self.plan = plan  # the model's: the phase of the forward, the tiles' placement (not a submodule)
        # False for the output layer: in prefill it sees the last position only, one row in a
        # cold prefill as after a prefix hit, so the decode kernel serves it.
        self.tiled_prefill = True
        weight = linear.weight.detach().float()  # in float32: shares a tied weight's storage
        if precision == "float32":
            wide = weight
        elif precision == "int8":
            wide = self._register("weight_int8", "scales", quantize_int8(weight))
        elif precision == "int4":
            wide = self._register("weight_int4", "scales_and_zeros", quantize_int4(weight))
        elif precision == "bfloat16":
            self.register_buffer("weight", weight.to(torch.bfloat16))
            wide = self.weight.float()
        else:
            raise ValueError(f"unknown decode precision {precision!r}")
        self.register_buffer("weight_float32", wide, persistent=False)
        bias = linear.bias
        bias_dtype = torch.float32 if precision == "float32" else torch.bfloat16
        self.register_buffer("bias", None if bias is None else bias.detach().to(bias_dtype))

    def _register(self, codes: str, scales: str, quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                  ) -> torch.Tensor:
        """Registers quantized weights under the names the decode kernel reads; returns them widened."""
        self.register_buffer(codes, quantized[0])
        self.register_buffer(scales, quantized[1])
        return quantized[2]

    def int4_codes(self) -> torch.Tensor:
        """The int4 codes (out, in) as int32 (precision int4 only)."""
        return int4_codes(self.weight_float32, self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        plan = self.plan
        if rows >= plan.gemm_rows or (plan.prefilling and self.tiled_prefill):
            out = tiled_gemm(flat, self.weight_float32, self.bias, GEMM_TILE_ROWS, plan.tile_offset(GEMM_TILE_ROWS),
                             plan.one_tile_parts, plan.min_tiles).to(x.dtype)
        else:
            out = self.decode_rows(flat)
        return out.reshape(*x.shape[:-1], self.out_features)

    def float32_tile(self, flat: torch.Tensor) -> torch.Tensor:
        return tiled_gemm(flat, self.weight_float32, self.bias, TILE_ROWS, self.plan.tile_offset(TILE_ROWS))


def layers_by_shape(model: nn.Module) -> list[DecodeLinear]:
    """One ``DecodeLinear`` of ``model`` for each distinct (in, out) shape, in the model's order."""
    layers: dict[tuple[int, int], DecodeLinear] = {}
    for module in model.modules():
        if isinstance(module, DecodeLinear):
            layers.setdefault((module.in_features, module.out_features), module)
    return list(layers.values())
