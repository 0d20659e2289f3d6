"""The gates a finished run must pass before it is registered: the recipe's `gates` section
checked against summary.json and benchmark.json. A miss is CheckFailed (exit 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.errors import CheckFailed
from compressor.recipe import GatesSpec

SUMMARY_FILE, BENCH_FILE = "summary.json", "benchmark.json"


def fp32_speedup(bench: dict[str, Any] | None) -> float | None:
    """onnxruntime fp32 p50 speedup at the first benchmarked shape (None without a benchmark)."""
    rows = [r for r in (bench or {}).get("results", []) if r["runtime"] == "onnxruntime"]
    return rows[0]["speedup_p50"] if rows else None


def gate_failures(
    gates: GatesSpec, summary: dict[str, Any], bench: dict[str, Any] | None
) -> list[str]:
    """One line per missed gate: the gate, the measured value and the limit."""
    out = []
    params = summary.get("student_params")
    if gates.max_params is not None and (params is None or params > gates.max_params):
        have = "an unknown number of" if params is None else f"{params:,}"
        out.append(
            f"gates.max_params: the student has {have} parameters, limit {gates.max_params:,}"
        )
    speedup = fp32_speedup(bench)
    if gates.min_speedup is not None:
        if speedup is None:
            out.append("gates.min_speedup: no onnxruntime benchmark ran (bench.enabled is false?)")
        elif speedup < gates.min_speedup:
            out.append(
                f"gates.min_speedup: onnxruntime fp32 speedup {speedup:.2f}x, limit {gates.min_speedup}x"
            )
    final = summary.get("discrepancy", {}).get("final")
    if gates.max_discrepancy is not None and (final is None or final > gates.max_discrepancy):
        out.append(
            f"gates.max_discrepancy: final discrepancy {final}, limit {gates.max_discrepancy}"
        )
    return out


def check_gates(gates: GatesSpec, run_dir: Path) -> None:
    """Raise CheckFailed naming every missed gate of a finished run."""
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    bench_path = run_dir / BENCH_FILE
    bench = json.loads(bench_path.read_text()) if bench_path.exists() else None
    failures = gate_failures(gates, summary, bench)
    if failures:
        lines = "\n  ".join(failures)
        raise CheckFailed(f"{run_dir}: gates failed; not registered in the zoo:\n  {lines}")
