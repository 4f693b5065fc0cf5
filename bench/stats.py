"""Small statistics helpers shared by the benchmarks: medians with min and max, percentiles."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def summary(values: Iterable[float], digits: int = 4) -> dict:
    """{"median", "min", "max", "n"} of `values` (None entries dropped)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(vals), digits),
        "min": round(min(vals), digits),
        "max": round(max(vals), digits),
        "n": len(vals),
    }


def percentile(values: Iterable[float], p: float) -> float | None:
    """The p-th percentile (0..100), linear interpolation between closest ranks."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return None
    k = (len(vals) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def paired(a: list[float], b: list[float], op) -> list[float]:
    """op(a_i, b_i) for each round where both sides have a value."""
    return [op(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
