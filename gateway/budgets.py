"""Per-hop millisecond budgets: the policy file, observed latencies, one request's budget."""
from __future__ import annotations

import math
import statistics
import time
import tomllib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.hop import BUDGETED, Hop
from meshkit.errors import DeadlineExceeded

# The names a policy file uses for the hops.
HOPS = tuple(str(hop) for hop in BUDGETED)
# Hops added after policy files were written: a file that leaves one out gets this budget for it.
HOP_DEFAULTS_MS = {str(Hop.EMBEDDING): 2000.0}


class BudgetPolicyError(ValueError):
    """The budget file is malformed: the gateway refuses to start with it."""


@dataclass(frozen=True)
class BudgetPolicy:
    default_total_ms: float
    hops: Mapping[str, float]
    templates: Mapping[str, BudgetPolicy] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> BudgetPolicy:
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise BudgetPolicyError(f"{path}: {error}") from None
        base = _policy(document, str(path), None)
        overrides = {
            template: _policy(section, f"{path} [templates.{template}]", base)
            for template, section in document.get("templates", {}).items()
        }
        return cls(base.default_total_ms, base.hops, overrides)

    @property
    def longest_total_ms(self) -> float:
        """The longest a request may last: the largest total budget of any template (a caller's budget_ms and
        deadline only shorten it)."""
        return max([self.default_total_ms, *(policy.default_total_ms for policy in self.templates.values())])

    def for_template(self, template_id: str | None) -> BudgetPolicy:
        return self.templates.get(template_id or "", self)

    def budget_for(self, hop: Hop) -> float:
        if hop == Hop.TOTAL:
            return self.default_total_ms
        return self.hops[hop]


def _policy(section: dict, where: str, base: BudgetPolicy | None) -> BudgetPolicy:
    unknown = set(section) - {"default_total_ms", "hops", "templates"} - (set(HOPS) if base else set())
    if unknown:
        raise BudgetPolicyError(f"{where}: unknown keys {sorted(unknown)}")
    stray = set(section.get("hops", {})) - set(HOPS) if base is None else set()
    if stray:
        raise BudgetPolicyError(f"{where}: unknown hops {sorted(stray)}; the hops are {list(HOPS)}")
    hops = dict(base.hops) if base else dict(HOP_DEFAULTS_MS)
    hops.update(section.get("hops", {}) if base is None else {h: section[h] for h in HOPS if h in section})
    total = section.get("default_total_ms", base.default_total_ms if base else None)
    missing = [hop for hop in HOPS if hop not in hops]
    if total is None or missing:
        raise BudgetPolicyError(f"{where}: needs default_total_ms and a budget for {missing or 'every hop'}")
    for name, value in [("default_total_ms", total), *hops.items()]:
        if not isinstance(value, (int, float)) or value <= 0:
            raise BudgetPolicyError(f"{where}: {name} must be a positive number of milliseconds")
    return BudgetPolicy(float(total), {hop: float(ms) for hop, ms in hops.items()})


class ObservedLatency:
    """Recent successful latencies per hop; their median judges what a hop needs."""

    def __init__(self, window: int = 256, min_samples: int = 5):
        self._samples: dict[str, deque[float]] = {}
        self._window = window
        self._min_samples = min_samples

    def record(self, hop: str, elapsed_ms: float) -> None:
        self._samples.setdefault(hop, deque(maxlen=self._window)).append(elapsed_ms)

    def typical_ms(self, hop: str) -> float | None:
        samples = self._samples.get(hop)
        if not samples or len(samples) < self._min_samples:
            return None
        return statistics.median(samples)


class RequestBudget:
    """One request's total budget, its hop budgets, and the time it has left."""

    def __init__(self, policy: BudgetPolicy, observed: ObservedLatency, caller_left_s: float | None,
                 budget_ms: int, started: float | None = None):
        self.policy = policy
        self._observed = observed
        self.started = time.perf_counter() if started is None else started
        caller_ms = caller_left_s * 1000.0 if caller_left_s is not None else math.inf
        self.total_ms = min(policy.default_total_ms, float(budget_ms) if budget_ms else math.inf, caller_ms)

    def left_ms(self) -> float:
        return self.total_ms - (time.perf_counter() - self.started) * 1000.0

    def budget_for(self, hop: Hop) -> float:
        return self.total_ms if hop == Hop.TOTAL else self.policy.budget_for(hop)

    def deadline_s(self, hop: Hop) -> float:
        """The deadline for the hop's call: min(hop budget, time left); never unbounded."""
        left = self.left_ms()
        if left <= 0:
            raise DeadlineExceeded(f"the request's {self.total_ms:.0f} ms budget ran out before {hop}", hop=hop)
        return min(self.policy.budget_for(hop), left) / 1000.0

    def ensure_can_cover(self, hops: Iterable[Hop]) -> None:
        """Fails at once when the time left cannot cover the hops ahead, as observed lately."""
        left = self.left_ms()
        needed = 0.0
        for hop in hops:
            needed += self._observed.typical_ms(hop) or 0.0
            if needed > left:
                raise DeadlineExceeded(
                    f"{max(left, 0):.1f} ms left cannot cover the {hop} hop "
                    f"(the hops up to it typically take {needed:.1f} ms)",
                    hop=str(Hop.INFERENCE if hop == Hop.INFERENCE_TTFT else hop),
                )
