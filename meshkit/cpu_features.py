"""What the CPU offers the model kernels (the inference engine's and the embedding replica's): torch's dispatch
level and the relevant /proc/cpuinfo flags.

Which kernel torch and its libraries (MKL, oneDNN) pick for a matrix multiply
depends on these, and so may the rounding of a row's result: an AVX2-only
machine and one with AVX-512 BF16/VNNI and AMX take different code paths. The
engine logs them at start beside the kernels it uses (services/inference/kernel_checks.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# The flags that change which CPU kernels run, in the order they are logged.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuFeatures:
    capability: str  # torch.backends.cpu.get_cpu_capability(): "DEFAULT", "AVX2", "AVX512", ...
    flags: frozenset[str]  # every flag of the first processor in /proc/cpuinfo (empty where unreadable)

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def avx512_vnni(self) -> bool:
        return "avx512_vnni" in self.flags

    @property
    def amx_bf16(self) -> bool:
        return "amx_bf16" in self.flags

    def summary(self) -> str:
        """One line for the log, e.g. ``torch AVX512; avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16``."""
        present = [flag for flag in KERNEL_FLAGS if flag in self.flags]
        return f"torch {self.capability}; {' '.join(present) if present else 'none of ' + ' '.join(KERNEL_FLAGS)}"


def parse_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor listed (x86 ``flags``, or ``Features`` on ARM)."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def read_cpu_features(cpuinfo: Path = CPUINFO) -> CpuFeatures:
    try:
        flags = parse_flags(cpuinfo.read_text())
    except OSError:  # not Linux, or no /proc
        flags = frozenset()
    return CpuFeatures(torch.backends.cpu.get_cpu_capability(), flags)
