"""Type checks of the JSON files of a run directory or a zoo entry, for readers that did not write
them (`zoo add`, `zoo report`): a wrong type is one RunDirError naming the file and the field,
never a KeyError or TypeError deep in a table or a plot.

Only what the zoo and its report read is checked; unknown keys are left alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.errors import RunDirError
from compressor.rundir import BENCH_FILE, METRICS_FILE, SUMMARY_FILE, evals_path
from compressor.shapes import Shape

SHAPE_KEYS = tuple(Shape.__dataclass_fields__)
Problems = list[str]


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _shape(x: Any) -> bool:
    return isinstance(x, dict) and all(_count(x.get(k)) for k in SHAPE_KEYS)


def summary_problems(d: dict[str, Any]) -> Problems:
    if not isinstance(d, dict):
        return ["not a JSON object"]
    p = []
    for key, ok, what in [
        ("teacher", lambda x: isinstance(x, str), "a string"),
        ("recipe", lambda x: isinstance(x, str), "a string"),
        ("student_shape", _shape, f"an object of integers {', '.join(SHAPE_KEYS)}"),
        ("teacher_shape", _shape, f"an object of integers {', '.join(SHAPE_KEYS)}"),
        ("student_params", _count, "a non-negative integer"),
        ("teacher_params", _count, "a non-negative integer"),
    ]:
        if not ok(d.get(key)):
            p.append(f"{key}: expected {what}, got {_shown(d.get(key))}")
    for key in ("discrepancy", "quality", "checks", "benchmark"):
        if key in d and d[key] is not None and not isinstance(d[key], dict):
            p.append(f"{key}: expected an object, got {_shown(d[key])}")
    final = (
        (d.get("discrepancy") or {}).get("final")
        if isinstance(d.get("discrepancy"), dict)
        else None
    )
    if final is not None and not _number(final):
        p.append(f"discrepancy.final: expected a number, got {_shown(final)}")
    quality = d.get("quality") if isinstance(d.get("quality"), dict) else {}
    if "similarity_spearman" in quality:  # the model card prints the three together
        for key in ("similarity_spearman", "neighbour_top1", "texts"):
            if not _number(quality.get(key)):
                p.append(f"quality.{key}: expected a number, got {_shown(quality.get(key))}")
    bench = d.get("benchmark") if isinstance(d.get("benchmark"), dict) else {}
    p += [f"benchmark.{k}: expected an object" for k, v in bench.items() if not isinstance(v, dict)]
    return p


def evaluations_problems(d: Any) -> Problems:
    if not isinstance(d, dict) or not isinstance(d.get("evaluations"), list):
        return [
            f"evaluations: expected a list, got {_shown((d or {}).get('evaluations') if isinstance(d, dict) else d)}"
        ]
    p = []
    for i, e in enumerate(d["evaluations"]):
        where = f"evaluations[{i}]"
        if not isinstance(e, dict):
            p.append(f"{where}: expected an object")
            continue
        for key in ("task", "metric"):
            if not isinstance(e.get(key), str):
                p.append(f"{where}.{key}: expected a string, got {_shown(e.get(key))}")
        for key in ("student", "teacher"):
            part = e.get(key)
            if key == "teacher" and part is None:
                continue
            if not isinstance(part, dict) or not _number(part.get("mean")):
                p.append(
                    f"{where}.{key}: expected an object with a numeric mean, got {_shown(part)}"
                )
            elif part.get("std") is not None and not _number(part["std"]):
                p.append(f"{where}.{key}.std: expected a number")
    return p


def benchmark_problems(d: Any, complete: bool = False) -> Problems:
    """Wrong types in a benchmark.json; with `complete`, every result must also carry its shape
    and both latencies (what the report plots)."""
    if not isinstance(d, dict) or not isinstance(d.get("results"), list):
        got = d.get("results") if isinstance(d, dict) else d
        return [f"results: expected a list, got {_shown(got)}"]
    p = []
    for i, r in enumerate(d["results"]):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            p.append(f"{where}: expected an object")
            continue
        if not isinstance(r.get("runtime"), str):
            p.append(f"{where}.runtime: expected a string, got {_shown(r.get('runtime'))}")
        for key in ("batch", "seq"):
            if key in r and not _count(r[key]):
                p.append(f"{where}.{key}: expected an integer, got {_shown(r[key])}")
        for key in ("student_ms", "teacher_ms"):
            if key in r and not (isinstance(r[key], dict) and _number(r[key].get("p50"))):
                p.append(f"{where}.{key}: expected an object with a numeric p50")
        if "speedup_p50" in r and r["speedup_p50"] is not None and not _number(r["speedup_p50"]):
            p.append(f"{where}.speedup_p50: expected a number, got {_shown(r['speedup_p50'])}")
        if complete or any(k in r for k in ("batch", "seq", "student_ms", "teacher_ms")):
            missing = [k for k in ("batch", "seq", "student_ms", "teacher_ms") if k not in r]
            p += [f"{where}.{k}: missing" for k in missing]
    return p


def metrics_problems(text: str) -> Problems:
    p = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            p.append(f"line {n}: not JSON ({err})")
            continue
        if not isinstance(record, dict):
            p.append(f"line {n}: expected an object, got {_shown(record)}")
            continue
        plotted = "discrepancy" in record or "params" in record
        if ("step" in record or plotted) and not _count(record.get("step")):
            p.append(f"line {n}: step: expected an integer, got {_shown(record.get('step'))}")
        for key in ("discrepancy", "params"):
            if key in record and not _number_or_none(record[key]):
                p.append(f"line {n}: {key}: expected a number, got {_shown(record[key])}")
        if "discrepancy_kind" in record and not isinstance(record["discrepancy_kind"], str):
            p.append(f"line {n}: discrepancy_kind: expected a string")
        if len(p) >= 5:
            break
    return p


def _number_or_none(x: Any) -> bool:
    return x is None or _number(x)


def _shown(x: Any) -> str:
    text = json.dumps(x) if not isinstance(x, str) else repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def check_run_files(d: Path) -> None:
    """Raise RunDirError naming the file and field of every wrong type in the summary,
    evaluations, benchmark and metrics of the run directory or entry `d`."""
    d = Path(d)
    problems: Problems = []
    checks = [
        (d / SUMMARY_FILE, summary_problems, True),
        (evals_path(d), evaluations_problems, False),
        (d / BENCH_FILE, benchmark_problems, False),
    ]
    for path, check, required in checks:
        if not path.is_file():
            if required:
                problems.append(f"{path}: missing")
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"{path}: not readable JSON ({err})")
            continue
        problems += [f"{path}: {p}" for p in check(data)]
    metrics = d / METRICS_FILE
    if metrics.is_file():
        try:
            problems += [f"{metrics}: {p}" for p in metrics_problems(metrics.read_text())]
        except (OSError, ValueError) as err:
            problems.append(f"{metrics}: not readable ({err})")
    if problems:
        raise RunDirError("malformed files:\n  " + "\n  ".join(problems[:20]))
