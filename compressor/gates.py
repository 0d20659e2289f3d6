"""The recipe's gates: limits a finished run must meet before it is registered (summary.json,
benchmark.json and, for the quality gate, evaluations.json against the recipe's `gates` section).
A miss is CheckFailed (exit 3).

The quality gate compares validation scores (never test: nothing is chosen on test) of the
student and its teacher, measured by `compress eval`'s code with the linear probe (zero-shot for
retrieval), and recorded in the run's evaluations.json like any `compress eval --probe`.

"Gates" means only this in the code: correctness checks live in checks.py and deploy/verify.py,
and the fade of a layer being removed is `Masks.fade`.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from compressor.deploy.bench import fp32_result
from compressor.errors import CheckFailed
from compressor.evaluate.evaluation import evaluation_of, recorded_or_evaluated
from compressor.evaluate.settings import EvalSettings
from compressor.recipe import GatesSpec, QualityGate, SpeedupGate
from compressor.rundir import BENCH_FILE, read_json, read_summary
from compressor.teacher import Teacher


def gate_failures(
    gates: GatesSpec,
    summary: dict[str, Any],
    bench: dict[str, Any] | None,
    evaluation: dict[str, Any] | None = None,
) -> list[str]:
    """One line per missed gate: the gate, the measured value and the limit. `evaluation` is
    the recorded evaluation the quality gate reads (see `quality_settings`)."""
    out = []
    params = summary.get("student_params")
    if gates.max_params is not None and (params is None or params > gates.max_params):
        have = "an unknown number of" if params is None else f"{params:,}"
        out.append(
            f"gates.max_params: the student has {have} parameters, limit {gates.max_params:,}"
        )
    if gates.min_speedup is not None:
        out += speedup_failures(gates.min_speedup, bench)
    final = summary.get("discrepancy", {}).get("final")
    if gates.max_discrepancy is not None and (final is None or not final <= gates.max_discrepancy):
        out.append(
            f"gates.max_discrepancy: final discrepancy {final}, limit {gates.max_discrepancy}"
        )
    if gates.max_quality_drop is not None:
        out += quality_failures(gates.max_quality_drop, evaluation)
    return out


def speedup_failures(gate: SpeedupGate, bench: dict[str, Any] | None) -> list[str]:
    """The speedup at the gate's shape must reach the limit and be measured without noise."""
    where = (
        "the first benchmarked shape"
        if gate.batch is None
        else f"batch {gate.batch} seq {gate.seq}"
    )
    row = fp32_result(bench, gate.batch, gate.seq)
    if row is None:
        return [f"gates.min_speedup: no onnxruntime benchmark at {where} (bench.enabled is false?)"]
    speedup = row["speedup_p50"]
    if not speedup >= gate.speedup:  # NaN fails
        return [
            f"gates.min_speedup: onnxruntime fp32 speedup {speedup:.2f}x at {where},"
            f" limit {gate.speedup}x"
        ]
    if row.get("noisy"):
        return [
            f"gates.min_speedup: onnxruntime fp32 speedup {speedup:.2f}x at {where} was measured"
            f" with noise above the bound {bench['max_spread']:.0%} (spreads: teacher"
            f" {row['teacher_ms']['spread']:.0%}, student {row['student_ms']['spread']:.0%});"
            " re-run `compress bench RUN_DIR` on a quiet machine, then `compress zoo add RUN_DIR`"
        ]
    return []


def quality_settings(gate: QualityGate) -> EvalSettings:
    """The evaluation the quality gate reads: the linear probe (cheap, deterministic)."""
    return EvalSettings(mode="probe", max_length=gate.max_length, max_train=gate.max_train,
                        max_eval=gate.max_eval)  # fmt: skip


def validation_score(result: dict[str, Any]) -> float:
    """One encoder's validation score in a recorded evaluation (mean over its runs)."""
    return statistics.fmean(result["validation"]) if result.get("validation") else float("nan")


def quality_failures(gate: QualityGate, evaluation: dict[str, Any] | None) -> list[str]:
    """The teacher's validation score minus the student's must not exceed `max_drop`."""
    if evaluation is None:
        return [f"gates.max_quality_drop: no probe evaluation of {gate.task} is recorded"]
    student = validation_score(evaluation["student"])
    teacher = validation_score(evaluation.get("teacher") or {})
    drop = teacher - student
    if not drop <= gate.max_drop:  # NaN fails
        return [
            f"gates.max_quality_drop: {gate.task} validation {evaluation['metric']}"
            f" ({evaluation['mode']}, {evaluation['splits'].get('validation')} examples):"
            f" student {student:.4f}, teacher {teacher:.4f}, drop {drop:.4f},"
            f" limit {gate.max_drop}"
        ]
    return []


def evaluate_for_gates(gates: GatesSpec, run_dir: Path, teacher: Teacher | None = None) -> None:
    """Record the evaluation the quality gate reads, unless the run already has it."""
    gate = gates.max_quality_drop
    if gate is not None:
        recorded_or_evaluated(Path(run_dir), gate.task, quality_settings(gate), [0], teacher)


def check_gates(gates: GatesSpec, run_dir: Path) -> None:
    """Raise CheckFailed naming every missed gate of a finished run."""
    summary = read_summary(run_dir).to_dict()
    gate = gates.max_quality_drop
    evaluation = evaluation_of(run_dir, gate.task, quality_settings(gate)) if gate else None
    failures = gate_failures(gates, summary, read_json(Path(run_dir) / BENCH_FILE), evaluation)
    if failures:
        lines = "\n  ".join(failures)
        raise CheckFailed(f"{run_dir}: gates failed; not registered in the zoo:\n  {lines}")
