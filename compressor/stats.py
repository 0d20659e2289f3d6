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


def paired_difference(a: list[float], b: list[float], resamples: int = 10_000,
                      level: float = 0.95, seed: int = 0) -> dict:  # fmt: skip
    """The mean of a - b over paired values (same seed, same texts) and its percentile bootstrap
    interval: the pairs resampled with replacement. `verdict` is "ahead" (a > b) or "behind" when
    the interval excludes 0, else "inside the noise". With n pairs the interval cannot be wider
    than the range of the differences; with 3 pairs it is that range (each extreme resample has
    probability 1/27 > 2.5%), so "ahead" then means ahead at every seed. One pair has no
    interval (`low` and `high` None) and no verdict."""
    import random

    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    if not diffs:
        raise ValueError("paired_difference: no pairs")
    if len(diffs) == 1:  # one seed: a difference, but no spread to bound it with
        return {"mean": diffs[0], "low": None, "high": None, "level": level, "n": 1,
                "verdict": "one seed: no interval", "per_seed": diffs}  # fmt: skip
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    low = means[int(tail * resamples)]
    high = means[min(resamples - 1, int((1.0 - tail) * resamples))]
    verdict = "ahead" if low > 0 else "behind" if high < 0 else "inside the noise"
    return {"mean": statistics.fmean(diffs), "low": low, "high": high, "level": level,
            "n": len(diffs), "verdict": verdict, "per_seed": diffs}  # fmt: skip
