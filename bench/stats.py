"""Latency summaries for the bench results, with meshkit's one percentile."""
from __future__ import annotations

import statistics

from meshkit.percentile import percentile


def summary_ms(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms)}
