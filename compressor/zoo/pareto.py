"""The Pareto front of (latency, quality) points: lower latency and higher quality are better.

A point is on the front when no other point dominates it, where p dominates q when p is at least
as fast and at least as good (`p.latency <= q.latency` and `p.quality >= q.quality`) and strictly
better in one of the two. Equal points do not dominate each other, so both stay on the front. A
point with a missing or non-finite coordinate is never on the front and dominates nothing.
"""

from __future__ import annotations

import math


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def dominates(p: tuple[float, float], q: tuple[float, float]) -> bool:
    """Whether p = (latency, quality) dominates q (both finite)."""
    no_worse = p[0] <= q[0] and p[1] >= q[1]
    return no_worse and (p[0] < q[0] or p[1] > q[1])


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[int]:
    """Indices (ascending) of the points on the front."""
    valid = [i for i, (lat, qual) in enumerate(points) if finite(lat) and finite(qual)]
    return [i for i in valid if not any(dominates(points[j], points[i]) for j in valid if j != i)]
