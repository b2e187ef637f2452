"""Percentiles for latency samples."""
from __future__ import annotations

import statistics


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank on the sorted samples."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms)}
