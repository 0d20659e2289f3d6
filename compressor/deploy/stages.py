"""The deployment stages of a finished run: export -> verify (raises on failure) -> benchmark.

Used by `compress run` at the end and by `compress export --onnx` / `compress bench` on an existing
run directory. The teacher's ONNX export is cached per teacher, so the latency comparison is
ONNX vs ONNX without re-exporting the teacher every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.cache import cache_root
from compressor.deploy.bench import benchmark, write_benchmark
from compressor.deploy.export import export_onnx, quantize_int8, save_samples
from compressor.deploy.sentence import GRAPH_REFERENCES
from compressor.deploy.verify import Tolerance, verify_export, write_and_gate
from compressor.recipe import Recipe, load_run_recipe
from compressor.rundir import (
    BENCH_FILE,
    HELDOUT_FILE,
    INT8_FILE,
    MODEL_DIR,
    ONNX_DIR,
    ONNX_FILE,
    SENTENCE_ONNX,
    VERIFY_FILE,
    read_summary,
    require_not_entry,
    write_summary,
)
from compressor.shapes import Shape
from compressor.teacher import Teacher, load_teacher, teacher_key
from compressor.trust import require_no_code


def deploy(
    run_dir: Path,
    teacher: Teacher | None = None,
    bench: bool | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Export -> verify (a gate) -> benchmark for a finished run; updates summary.json. A model
    holding code (custom sentence-transformers modules, .py files) is refused before anything
    loads unless `trust_remote_code`."""
    run_dir = require_not_entry(Path(run_dir))
    require_no_code(run_dir / MODEL_DIR, trust_remote_code, "the model is exported")
    summary = read_summary(run_dir)
    recipe = load_run_recipe(run_dir)
    summary.benchmark = summary.export = None  # a failed export must not leave a success behind
    write_summary(run_dir, summary)
    summary.export = export_and_verify(recipe, run_dir, trust_remote_code)
    if recipe.bench.enabled if bench is None else bench:
        result = bench_run(recipe, run_dir, teacher or load_teacher(recipe.teacher))
        summary.benchmark = bench_summary(result)
    write_summary(run_dir, summary)
    return summary.to_dict()


def bench_summary(result: dict[str, Any]) -> dict[str, Any]:
    """summary.json's view of benchmark.json: speedup, FLOP ratio and noise per measurement."""
    return {
        f"{r['runtime']}_b{r['batch']}_t{r['seq']}": {
            "speedup_p50": r["speedup_p50"],
            "flop_ratio": r["flop_ratio"],
            "noisy": r["noisy"],
        }
        for r in result["results"]
    }


def export_and_verify(
    recipe: Recipe, run_dir: Path, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Export the slim model, save samples + references, verify fp32 (and int8). Raises
    CheckFailed when any check fails; verify.json is written either way."""
    e = recipe.export
    onnx_dir = run_dir / ONNX_DIR
    report = export_onnx(run_dir / MODEL_DIR, onnx_dir, int8=e.int8, optimize=e.optimize,
                         trust_remote_code=trust_remote_code)  # fmt: skip
    texts = json.loads((run_dir / HELDOUT_FILE).read_text())
    save_samples(onnx_dir, run_dir / MODEL_DIR, texts, e.batch_sizes, e.seq_lengths)
    return {**report, "verify": verify_onnx(recipe, run_dir, write=True)}


def verify_again(run_dir: Path, write: bool = True) -> dict[str, Any]:
    """Re-run the stored check on the stored samples (no PyTorch weights needed). `run_dir` is any
    directory holding onnx/ and recipe.yaml (a run, a zoo entry); `write=False` leaves it as is."""
    return verify_onnx(load_run_recipe(run_dir), Path(run_dir), write)


def verify_onnx(recipe: Recipe, run_dir: Path, write: bool) -> dict[str, Any]:
    """Verify model.onnx (and model_int8.onnx, and the sentence-transformers graph
    model/onnx/model.onnx, when present) against the stored samples."""
    e, onnx_dir = recipe.export, run_dir / ONNX_DIR
    fp32 = Tolerance(e.atol, e.rtol, e.min_agreement)
    reports = [verify_export(onnx_dir, ONNX_FILE, fp32)]
    if (run_dir / SENTENCE_ONNX).exists():
        reports.append(verify_export(run_dir, SENTENCE_ONNX, fp32, GRAPH_REFERENCES, onnx_dir))
    if (onnx_dir / INT8_FILE).exists():
        tol = Tolerance(e.int8_atol, e.int8_rtol, e.int8_min_agreement)
        reports.append(verify_export(onnx_dir, INT8_FILE, tol))
    write_and_gate(reports, run_dir / VERIFY_FILE if write else None)
    return summarize(reports)


def summarize(reports) -> dict[str, Any]:
    out = {}
    for r in reports:
        values = [c for c in r.checks if "max_abs_diff" in c]
        agree = next(c for c in r.checks if "min" in c)
        out[r.model] = {
            "passed": r.passed,
            "max_abs_diff": max(c["max_abs_diff"] for c in values) if values else None,
            **{k: v for k, v in agree.items() if k != "min"},
        }
    return out


def cached_teacher_export(teacher: Teacher, int8: bool, optimize: bool) -> Path:
    """HF dir + ONNX export of the teacher, built once per teacher content and export setting."""
    d = cache_root() / "teachers" / f"{teacher_key(teacher)}{'-fused-sumln' if optimize else ''}"
    hf_dir, onnx_dir = d / "hf", d / ONNX_DIR
    if not (onnx_dir / ONNX_FILE).exists():
        teacher.model.cpu().save_pretrained(hf_dir, safe_serialization=True)
        teacher.tokenizer.save_pretrained(hf_dir)
        export_onnx(hf_dir, onnx_dir, int8=False, optimize=optimize)
    if int8 and not (onnx_dir / INT8_FILE).exists():
        quantize_int8(onnx_dir / ONNX_FILE, onnx_dir / INT8_FILE)
    return d


def bench_run(recipe: Recipe, run_dir: Path, teacher: Teacher) -> dict[str, Any]:
    """Student vs teacher latency; writes benchmark.json."""
    from transformers import AutoConfig

    b = recipe.bench
    t_dir = cached_teacher_export(teacher, recipe.export.int8, recipe.export.optimize)
    t_onnx, s_onnx = t_dir / ONNX_DIR, run_dir / ONNX_DIR
    models: dict[str, dict[str, str]] = {
        "teacher": {"onnxruntime": str(t_onnx / ONNX_FILE)},
        "student": {"onnxruntime": str(s_onnx / ONNX_FILE)},
    }
    if recipe.export.int8:
        models["teacher"]["onnxruntime_int8"] = str(t_onnx / INT8_FILE)
        models["student"]["onnxruntime_int8"] = str(s_onnx / INT8_FILE)
    if b.torch_baseline:
        models["teacher"]["torch"] = str(t_dir / "hf")
        models["student"]["torch"] = str(run_dir / MODEL_DIR)
    shapes = {
        "teacher": teacher.shape,
        "student": Shape.of_config(AutoConfig.from_pretrained(run_dir / MODEL_DIR)),
    }
    grid = [(bs, sl) for bs in b.batch_sizes for sl in b.seq_lengths]
    result = benchmark(models, shapes, grid, b.threads, b.warmup, b.iters, b.rounds, b.max_spread,
                       b.remeasure)  # fmt: skip
    write_benchmark(result, run_dir / BENCH_FILE)
    return result


def bench_run_dir(run_dir: Path) -> dict[str, Any]:
    """Re-run the latency benchmark of a finished, exported run (`compress bench`); summary.json
    follows, so the zoo never pairs a new benchmark with an old noise flag."""
    run_dir = require_not_entry(Path(run_dir))
    recipe = load_run_recipe(run_dir)
    summary = read_summary(run_dir)
    result = bench_run(recipe, run_dir, load_teacher(recipe.teacher))
    summary.benchmark = bench_summary(result)
    write_summary(run_dir, summary)
    return result
