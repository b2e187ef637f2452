"""Several decode layers' outputs in one kernel call: q, k and v, or gate and up.

A decode step reads every weight once and calls a kernel per linear layer; with
few rows, each call's fixed cost is a good part of its time. Layers that read the
same input can be one call over their weights side by side, where that gives each
output the very bits of its own layer (checked when joined: a kernel may block
output channels in a way that changes the rounding), so the decode step's logits
stay those of the model's forward (services/inference/decode_step.py).
"""
from __future__ import annotations

import torch

from services.inference.decode_linear import DecodeKernel, DecodeLinear
from services.inference.quantize import pack_int4
from services.inference.tiles import MAX_DECODE_ROWS

# The decode buffers that run along a layer's outputs, with the dimension they run along. float32 has
# none: it decodes through the tiled GEMM, whose bits may depend on the output count.
_OUTPUT_BUFFERS = {"int8": (("weight_int8", 0), ("scales", 0)), "int4": (("weight_int4", 0), ("scales_and_zeros", 1)),
                   "bfloat16": (("weight", 0),)}


class JoinedLinear(DecodeKernel):
    """The decode kernel of ``linears`` (the same inputs and precision, a bias on all or none: Qwen2's
    q, k and v have one) over their weights and biases side by side. Decode only: it holds no float32
    copy for prefill. Its weights are a copy of theirs."""

    def __init__(self, linears: list[DecodeLinear]):
        super().__init__()
        if not joinable(linears):
            raise ValueError("only layers of one precision with a joinable decode kernel, the same inputs and "
                             "a bias on all or none can be joined")
        first = linears[0]
        self.in_features, self.out_features = first.in_features, sum(linear.out_features for linear in linears)
        self.precision = first.precision
        for name, dim in _OUTPUT_BUFFERS[first.precision]:
            if name == "weight_int4":  # packed in blocks of output rows: join the codes, pack once
                self.register_buffer(name, pack_int4(torch.cat([linear.int4_codes() for linear in linears])))
            else:
                self.register_buffer(name, torch.cat([getattr(linear, name) for linear in linears], dim=dim)
                                     .contiguous())
        biases = [linear.bias for linear in linears]
        self.register_buffer("bias", None if biases[0] is None else torch.cat(biases))

    @classmethod
    def join(cls, linears: list[DecodeLinear]) -> JoinedLinear | None:
        """The joined layer, or None where it would not give every output the very bits of its own layer
        on this CPU (checked on random rows, at every decode batch size) or the layers cannot be joined."""
        if not joinable(linears):
            return None
        joined = cls(linears)
        return joined if joined.keeps_the_bits_of(linears) else None

    def keeps_the_bits_of(self, linears: list[DecodeLinear]) -> bool:
        x = torch.randn(MAX_DECODE_ROWS, self.in_features, generator=torch.Generator().manual_seed(2))
        x = x.to(self.activation_dtype)
        with torch.inference_mode():
            for rows in range(1, MAX_DECODE_ROWS + 1):
                own = torch.cat([linear.decode_rows(x[:rows]) for linear in linears], dim=1)
                if not torch.equal(self.decode_rows(x[:rows]), own):
                    return False
        return True


def joinable(linears: list[DecodeLinear]) -> bool:
    first = linears[0]
    return first.precision in _OUTPUT_BUFFERS and all(
        linear.precision == first.precision and linear.in_features == first.in_features
        and (linear.bias is None) == (first.bias is None) for linear in linears)
