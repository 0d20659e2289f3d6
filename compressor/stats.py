"""Summaries over seeds: one function, used by every table that reports a mean and a spread."""

from __future__ import annotations

import statistics


def over_seeds(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), count and every value."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "per_seed": values,
    }
