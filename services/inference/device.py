"""Where the model runs: NLPMESH_INFERENCE_DEVICE = auto | cpu | cuda.

On CPU the engine runs the precision NLPMESH_INFERENCE_DTYPE asks for, with
the fixed-tile kernels that keep a row's bits independent of the batch
(services/inference/decode_linear.py). On CUDA it runs the model in bfloat16 with
transformers' SDPA attention (torch's fused kernels), the same engine
(continuous batching, chunked prefill, prefix tiers) around it; the batch
invariance of the CPU kernels is not claimed there.
"""
from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str) -> torch.device:
    """The device for ``requested``: auto takes CUDA where torch sees a CUDA device, else the CPU.
    Raises ValueError for cuda where there is none, naming what torch has."""
    if requested not in DEVICES:
        raise ValueError(f"NLPMESH_INFERENCE_DEVICE={requested!r}: expected one of {', '.join(DEVICES)}")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ValueError(f"NLPMESH_INFERENCE_DEVICE=cuda, but torch {torch.__version__} ({built}) sees no CUDA "
                         "device; use cpu or auto")
    return torch.device("cuda" if requested == "cuda" or (requested == "auto" and available) else "cpu")


def describe(device: torch.device) -> str:
    """One line for the start-up log."""
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}: bfloat16, SDPA attention"
    return "CPU"
