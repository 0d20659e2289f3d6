"""Metrics: one JSON object per line in the run dir, and the plot drawn from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

from compressor.rundir import METRICS_FILE


class MetricsLog:
    """Appends records; on resume, drops records written after the checkpoint it resumes from
    (all of them when it starts again from step 0: a run killed before its first checkpoint).
    Not `enabled` (every process but rank 0 of a torchrun): touches nothing, writes nothing."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, enabled: bool = True):
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        if not enabled:
            return
        if resume_step == 0:
            self.path.write_text("")
        elif resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if _before(r, resume_step)]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _before(record: dict[str, Any], resume_step: int) -> bool:
    """Whether a record was written before the step a run resumes at. Step records carry the
    number of steps done; pruning events the index of the step they open (run again on resume)."""
    if record.get("event") == "prune":
        return record["step"] < resume_step
    return record["step"] <= resume_step


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def discrepancy_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """Start, peak and final teacher-student discrepancy on the held-out batch."""
    d = [(r["step"], r["discrepancy"]) for r in records if "discrepancy" in r]
    if not d:
        return {}
    peak_step, peak = max(d, key=lambda x: x[1])
    return {"start": d[0][1], "peak": peak, "peak_step": peak_step, "final": d[-1][1]}


def plot_run(records: list[dict[str, Any]], out: Path | BinaryIO, title: str) -> None:
    """Discrepancy and parameter count over steps, one PNG (a file, or a binary stream)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in records if "discrepancy" in r]
    tr = [r for r in records if "params" in r]
    fig, ax1 = plt.subplots(figsize=(8, 4.5))
    ax1.plot([r["step"] for r in ev], [r["discrepancy"] for r in ev], color="tab:red", marker=".")
    ax1.set_xlabel("step")
    kind = str(ev[0].get("discrepancy_kind", "discrepancy")) if ev else "discrepancy"
    ax1.set_ylabel(kind, color="tab:red", parse_math=False)
    ax2 = ax1.twinx()
    ax2.plot([r["step"] for r in tr], [r["params"] / 1e6 for r in tr], color="tab:blue")
    ax2.set_ylabel("student parameters (M)", color="tab:blue")
    ax1.set_title(title, parse_math=False)  # text from a run, not mathtext
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
