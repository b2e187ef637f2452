"""The one percentile nlpmesh reports: `nlpmesh budgets` and the bench results both use it.

The method is linear interpolation between the two nearest ranks: numpy's
default (``method="linear"``) and ``statistics.quantiles(method="inclusive")``.
The p-th percentile sits at position ``(n - 1) * p / 100`` of the sorted values;
between two values it is the straight line from one to the other. So the p50
is the median (5.5 for 1..10), p0 the smallest value and p100 the largest.
"""
from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0 to 100) of ``values``, linearly interpolated (see the module docstring)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values to take a percentile of")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside 0..100")
    position = (len(ordered) - 1) * p / 100
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)
