"""Benchmark: progressive slimming (pruning.progressive_slim) against masking only, the same recipe
run side by side in one invocation on this machine: wall-time ratio, against the ideal.

    OMP_NUM_THREADS=1 .venv/bin/python tools/studies/slim_benchmark.py --out /tmp/slim-bench \
        [--recipe recipes/minilm-to-4L256.yaml] [--threads 1] [--set train.steps=100 ...]

The two runs go at once, in two processes (`--sequential`: one after the other, masking only
first), so that the rest of the machine's load slows both alike; no export or benchmark stage. Timed:
the whole run, and its training loop (`distill`). The ideal is the area under the schedule's
per-step FLOP curve (`schedule.shapes_by_step`, `bench.encoder_flops` at the recipe's max_length)
over full width: for the student alone, and for a step as it is made (the teacher's forward at
full width plus the student's forward and backward, taken as 3 forwards). Prints a table and
writes slim_benchmark.json into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from compressor import pipeline
from compressor.deploy.bench import encoder_flops
from compressor.prune.schedule import Schedule
from compressor.recipe import load_recipe, with_overrides
from compressor.rundir import PLAN_FILE
from compressor.shapes import Shape
from compressor.teacher import read_teacher_config

MODES = {"masking": "false", "progressive": "true"}
BACKWARD = 2  # a backward pass costs about two forwards


def ideal_ratios(shapes: list[Shape], full: Shape, seq: int) -> dict[str, float]:
    """Cost of progressive slimming over masking only, in FLOPs: the student alone, and a whole
    step (teacher forward + student forward and backward)."""
    student = sum(encoder_flops(s, seq) for s in shapes) / (len(shapes) * encoder_flops(full, seq))
    train = 1 + BACKWARD
    step = (1 + train * student) / (1 + train)
    return {"student_flops": student, "step_flops": step}


def timed(inner):
    """`inner` (the training loop) recording its wall time."""
    seconds = []

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t)

    return wrapper, seconds


def run_mode(job: tuple[str, Path, list[str]]) -> dict:
    """One run (in its own process when run in parallel), timed."""
    recipe, out, overrides = job
    distill = pipeline.distill
    pipeline.distill, loop = timed(distill)
    t = time.perf_counter()
    run = pipeline.run(recipe, output=out, register=False, overrides=overrides)
    pipeline.distill = distill
    return {
        "run_s": round(time.perf_counter() - t, 1),
        "loop_s": round(loop[0], 1),
        "similarity_spearman": run.summary["quality"]["similarity_spearman"],
        "discrepancy_final": run.summary["discrepancy"]["final"],
        "masked_vs_slim_max_abs": run.summary["checks"]["masked_vs_slim_max_abs"],
        "run_dir": str(run.run_dir),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/minilm-to-4L256.yaml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--sequential", action="store_true", help="one run after the other")
    args = ap.parse_args()

    common = [f"train.threads={args.threads}", "export.onnx=false", "bench.enabled=false",
              *args.overrides]  # fmt: skip
    recipe = with_overrides(load_recipe(args.recipe), common)
    full = Shape.of_config(read_teacher_config(recipe.teacher))
    sched = Schedule.of(recipe.pruning, full, recipe.target.shape())
    shapes = sched.shapes_by_step(recipe.train.steps)
    ideal = ideal_ratios(shapes, full, recipe.data.max_length)

    jobs = [(args.recipe, args.out / mode, [*common, f"pruning.progressive_slim={flag}"])
            for mode, flag in MODES.items()]  # fmt: skip
    if args.sequential:
        results = dict(zip(MODES, map(run_mode, jobs), strict=True))
    else:  # both at once: whatever else loads the machine slows both alike
        with ProcessPoolExecutor(len(jobs), mp_context=get_context("spawn")) as pool:
            results = dict(zip(MODES, pool.map(run_mode, jobs), strict=True))
    m, g = results["masking"], results["progressive"]
    same_plan = (Path(m["run_dir"]) / PLAN_FILE).read_text() == (
        Path(g["run_dir"]) / PLAN_FILE
    ).read_text()
    out = {
        "recipe": recipe.name,
        "overrides": common,
        "parallel": not args.sequential,
        "steps": recipe.train.steps,
        "runs": results,
        "ratio": {
            "run": round(g["run_s"] / m["run_s"], 3),
            "loop": round(g["loop_s"] / m["loop_s"], 3),
            **{f"ideal_{k}": round(v, 3) for k, v in ideal.items()},
        },
        "same_plan": same_plan,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slim_benchmark.json").write_text(json.dumps(out, indent=2))
    print(
        f"{recipe.name}, {recipe.train.steps} steps, {args.threads} thread(s); same plan: {same_plan}"
    )
    print(f"{'':12} {'run s':>8} {'loop s':>8} {'spearman':>9} {'final disc':>11}")
    for mode, r in results.items():
        print(f"{mode:12} {r['run_s']:8.1f} {r['loop_s']:8.1f} {r['similarity_spearman']:9.4f}"
              f" {r['discrepancy_final']:11.4g}")  # fmt: skip
    ratio = out["ratio"]
    print(f"progressive / masking: run {ratio['run']:.3f}, loop {ratio['loop']:.3f};"
          f" ideal: student FLOPs {ratio['ideal_student_flops']:.3f},"
          f" step FLOPs (teacher + student) {ratio['ideal_step_flops']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
