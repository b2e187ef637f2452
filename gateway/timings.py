"""A hop's timing against its budget, as each response and its ``server-timing`` trailer show it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HopTiming:
    hop: str
    elapsed_ms: float
    budget_ms: float = 0.0

    @property
    def over_budget(self) -> bool:
        return self.budget_ms > 0 and self.elapsed_ms > self.budget_ms


def server_timing(timings: list[HopTiming]) -> str:
    """The HTTP Server-Timing syntax: ``template;dur=0.41;desc="budget 100", cache;dur=0.62``."""
    parts = []
    for t in timings:
        part = f"{t.hop};dur={t.elapsed_ms:.3f}"
        if t.budget_ms:
            part += f';desc="budget {t.budget_ms:g}{" over" if t.over_budget else ""}"'
        parts.append(part)
    return ", ".join(parts)
