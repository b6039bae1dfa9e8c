"""Figures shared by the benchmarks."""

from __future__ import annotations


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank value below which `share` of `values` lie (0.95 -> p95)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]
