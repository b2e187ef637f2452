"""Weight quantisation for the decode kernels: int8 per output channel, int4 in groups.

Decode reads every weight of the model once a token, so it is bound by reading
weights and wants the fewest bytes per weight. These are the layouts torch's CPU
kernels read (``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``),
each with the float32 values it stands for, so that prefill's float32 GEMM
(services/inference/decode_linear.py) multiplies the very weights decode does.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# int4: each group of this many input weights of an output row has its own scale and
# offset (llama.cpp's Q4_1 block); torch's CPU int4pack layout needs output rows by 16.
INT4_GROUP = 32
INT4_ROW_MULTIPLE = 16


class Int8Weights(NamedTuple):
    codes: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) bfloat16
    widened: torch.Tensor  # (out, in) float32: codes * scales exactly


class Int4Weights(NamedTuple):
    packed: torch.Tensor  # torch's CPU int4pack layout
    scales_and_zeros: torch.Tensor  # (groups, out, 2) bfloat16
    widened: torch.Tensor  # (out, in) float32: (codes - 8) * scale + zero exactly


def quantize_int8(weight: torch.Tensor) -> Int8Weights:
    """Symmetric, one scale per output channel (absmax / 127)."""
    scales = (weight.abs().amax(dim=1).clamp(min=1e-8) / 127).to(torch.bfloat16)
    codes = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weights(codes, scales, codes.float() * scales.float()[:, None])


def quantize_int4(weight: torch.Tensor) -> Int4Weights:
    """Groups of ``INT4_GROUP`` input weights, each a bfloat16 scale and offset: w = (q - 8) * scale + zero,
    so q = 0 is the group's minimum and 15 its maximum (llama.cpp's Q4_1 grid)."""
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
    widened = ((codes.float() - 8) * scale.float()[..., None] + zero.float()[..., None]).view(rows, columns)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return Int4Weights(pack_int4(codes.view(rows, columns)), scales_and_zeros, widened)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes (out, in) as int32 in torch's CPU int4pack layout (packed in blocks of output rows)."""
    return torch._convert_weight_to_int4pack_for_cpu(codes, 1)


def int4_codes(widened: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The int4 codes (out, in) as int32, from the float32 values: each is (w - zero) / scale + 8 exactly."""
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out, groups) each
    rows, columns = widened.shape
    groups = widened.view(rows, columns // INT4_GROUP, INT4_GROUP)
    codes = torch.round((groups - zero[..., None]) / scale[..., None]) + 8
    return codes.clamp(0, 15).to(torch.int32).view(rows, columns)
