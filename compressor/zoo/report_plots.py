"""The zoo report's figures as PNG bytes (matplotlib, Agg) and the data: URIs that inline them."""

from __future__ import annotations

import base64
import io
from typing import Any

from compressor.metrics import plot_run


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def curve_png(records: list[dict[str, Any]], title: str) -> bytes:
    """The run's own plot (metrics.plot_run): held-out discrepancy and parameters over steps."""
    buf = io.BytesIO()
    plot_run(records, buf, title)
    return buf.getvalue()


def quality_latency_png(
    points: list[tuple[str, float, float]],
    front: list[int],
    teachers: list[tuple[str, float]],
    xlabel: str,
    ylabel: str,
) -> bytes:
    """points: (label, latency ms, quality) per entry; `front`: indices of the Pareto front,
    joined by a step line and ringed; teachers: (label, latency ms) at quality 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    on_front = set(front)
    others = [p for i, p in enumerate(points) if i not in on_front]
    ax.scatter([p[1] for p in others], [p[2] for p in others], color="tab:gray", label="entry")
    best = sorted((points[i] for i in front), key=lambda p: p[1])
    ax.plot([p[1] for p in best], [p[2] for p in best], color="tab:red", drawstyle="steps-post")
    ax.scatter([p[1] for p in best], [p[2] for p in best], color="tab:red", s=60,
               edgecolors="black", zorder=3, label="Pareto front")  # fmt: skip
    for label, x, y in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9,
                    parse_math=False)  # fmt: skip
    for k, (label, x) in enumerate(teachers):
        ax.scatter([x], [1.0], marker="*", s=180, color="tab:blue", zorder=3,
                   label=None if k else "teacher")  # fmt: skip
        ax.annotate(
            label,
            (x, 1.0),
            textcoords="offset points",
            xytext=(6, -12),
            fontsize=9,
            parse_math=False,
        )  # teacher names are entry text, not mathtext
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")  # the ideal corner (fast and close to the teacher) is empty
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
