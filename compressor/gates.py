"""The recipe's gates: limits a finished run must meet before it is registered (summary.json and
benchmark.json against the recipe's `gates` section). A miss is CheckFailed (exit 3).

"Gates" means only this in the code: correctness checks live in checks.py and deploy/verify.py,
and the fade of a layer being removed is `Masks.fade`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.deploy.bench import fp32_speedup
from compressor.errors import CheckFailed
from compressor.recipe import GatesSpec
from compressor.rundir import BENCH_FILE, read_json, read_summary


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
        elif not speedup >= gates.min_speedup:  # NaN fails
            out.append(
                f"gates.min_speedup: onnxruntime fp32 speedup {speedup:.2f}x, limit {gates.min_speedup}x"
            )
    final = summary.get("discrepancy", {}).get("final")
    if gates.max_discrepancy is not None and (final is None or not final <= gates.max_discrepancy):
        out.append(
            f"gates.max_discrepancy: final discrepancy {final}, limit {gates.max_discrepancy}"
        )
    return out


def check_gates(gates: GatesSpec, run_dir: Path) -> None:
    """Raise CheckFailed naming every missed gate of a finished run."""
    summary = read_summary(run_dir).to_dict()
    failures = gate_failures(gates, summary, read_json(Path(run_dir) / BENCH_FILE))
    if failures:
        lines = "\n  ".join(failures)
        raise CheckFailed(f"{run_dir}: gates failed; not registered in the zoo:\n  {lines}")
