"""The default recipe over seeds x thread counts: quality of the shipped model, mean and spread,
and how far the plan moves when only the thread count does.

    .venv/bin/python tools/results/results.py --out runs/results            # 3 seeds x {1, 2} threads
    .venv/bin/python tools/results/results.py --out runs/results --perturb  # + seed 0 at the first thread
                            # count, the teacher nudged by relative 1e-6 noise, and under bf16 autocast

Each run is `compress run RECIPE --set train.seed=S --set train.threads=T` (no export, no zoo:
quality only) in its own process; finished runs under --out are reused, so re-running resumes.
A perturbed run is compared, plan against plan, with the same seed and thread count unperturbed.
Writes results.md and results.json beside the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from compressor.recipe import load_recipe, require_same_recipe, with_overrides
from compressor.rundir import PLAN_FILE, SUMMARY_FILE, read_json
from compressor.stats import over_seeds

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("similarity_spearman", "neighbour_top1", "neighbour_top5")


# what a perturbed run changes: recipe overrides, and the teacher's relative weight nudge
PERTURBATIONS = {"weights_1e-6": ([], 1e-6), "bf16_autocast": (["train.precision=bf16"], 0.0)}


def finished(root: Path) -> Path | None:
    done = [d for d in sorted(root.glob("*/*/")) if (d / SUMMARY_FILE).exists()]
    return done[-1] if done else None


def run_once(recipe: Path, out: Path, seed: int, threads: int, perturbation: str = "") -> Path:
    root = out / f"seed{seed}-threads{threads}{'-' + perturbation if perturbation else ''}"
    extra, nudge = PERTURBATIONS.get(perturbation, ([], 0.0))
    sets = [f"train.seed={seed}", f"train.threads={threads}", "export.onnx=false",
            "bench.enabled=false", *extra]  # fmt: skip
    if (d := finished(root)) is not None:  # reused only if made with the same recipe
        return require_same_recipe(d, with_overrides(load_recipe(recipe), sets))
    cmd = [sys.executable, "-m", "compressor", "run", str(recipe), "--output", str(root),
           "--no-register", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    if nudge:  # the same run in a child process, with the nudged teacher
        cmd = [sys.executable, __file__, "--nudged-run", str(nudge), *cmd[4:]]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return finished(root)


def seed_spread(runs: list[dict], seeds: list[int], value) -> dict:
    """Mean and spread over seeds of each seed's mean over its thread counts, and the largest
    change the thread count made to any seed's value (the spread is the seeds', not the runs')."""
    by_seed = [[value(r) for r in runs if r["seed"] == s] for s in seeds]
    return {**over_seeds([statistics.fmean(v) for v in by_seed]),
            "max_thread_change": max(max(v) - min(v) for v in by_seed)}  # fmt: skip


def nudged_run(relative: float, argv: list[str]) -> None:
    """`compress run` with the recipe's teacher nudged by `relative` noise (argv: run's args)."""
    from compressor import pipeline
    from compressor.teacher import load_teacher, nudged

    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--output", type=Path)
    ap.add_argument("--no-register", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args(argv)
    recipe = with_overrides(load_recipe(a.recipe), a.set)
    teacher = nudged(load_teacher(recipe.teacher), relative)
    pipeline.run(recipe, a.output, teacher=teacher, register=False)


def overlap(a: dict, b: dict) -> dict[str, float]:
    """Share of the structures kept by plan `a` that plan `b` keeps too, per kind."""

    def flat(plan: dict, kind: str) -> set:
        if kind == "hidden":
            return set(plan["hidden"])
        return {(layer, i) for layer, kept in zip(plan["layers"], plan[kind], strict=True)
                for i in kept}  # fmt: skip

    out = {"layers_identical": float(a["layers"] == b["layers"])}
    for kind in ("hidden", "heads", "ffn"):
        x, y = flat(a, kind), flat(b, kind)
        out[kind] = len(x & y) / len(x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "minilm-to-4L256.yaml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--perturb", action="store_true", help="+ seed 0: 1e-6 weight nudge, bf16")
    if len(sys.argv) > 2 and sys.argv[1] == "--nudged-run":
        return nudged_run(float(sys.argv[2]), sys.argv[3:])
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    runs = []
    for seed in seeds:
        for t in threads:
            d = run_once(args.recipe, args.out, seed, t)
            summary, plan = read_json(d / SUMMARY_FILE), read_json(d / PLAN_FILE)
            runs.append({"seed": seed, "threads": t, "run_dir": str(d), "plan": plan,
                         "quality": summary["quality"],
                         "discrepancy_final": summary["discrepancy"]["final"]})  # fmt: skip
    values = {**{m: lambda r, m=m: r["quality"][m] for m in METRICS},
              "discrepancy_final": lambda r: r["discrepancy_final"]}  # fmt: skip
    table = {name: seed_spread(runs, seeds, get) for name, get in values.items()}
    by = {(r["seed"], r["threads"]): r for r in runs}  # unperturbed runs only
    stability = {  # label -> overlap of two plans, with the kept layers of the second
        f"{seed}, {t} threads": {**overlap(by[(seed, threads[0])]["plan"], by[(seed, t)]["plan"]),
                                 "layers": by[(seed, t)]["plan"]["layers"]}
        for seed in seeds
        for t in threads[1:]
    }  # fmt: skip
    for name in PERTURBATIONS if args.perturb else ():
        d = run_once(args.recipe, args.out, seeds[0], threads[0], name)
        runs.append({"seed": seeds[0], "threads": threads[0], "perturbation": name,
                     "run_dir": str(d), "plan": read_json(d / PLAN_FILE),
                     "quality": read_json(d / SUMMARY_FILE)["quality"]})  # fmt: skip
        base = by[(seeds[0], threads[0])]["plan"]
        stability[f"{seeds[0]}, {name}"] = {**overlap(base, runs[-1]["plan"]),
                                            "layers": runs[-1]["plan"]["layers"]}  # fmt: skip
    lines = [
        f"{args.recipe.name}: {len(by)} runs (seeds {seeds} x threads {threads})",
        "",
        f"| measure | mean over seeds | std | std / mean | per seed {seeds} | largest change"
        f" between thread counts {threads} |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in table.items():
        each = ", ".join(f"{x:.4f}" for x in v["per_seed"])
        lines.append(
            f"| {name} | {v['mean']:.4f} | {v['std']:.4f} | {v['std'] / abs(v['mean']):.1%} | {each}"
            f" | {v['max_thread_change']:.1e} |"
        )
    lines += ["", "| run | kept layers | plan overlap (threads: with the seed's run at "
              f"{threads[0]} thread(s); a perturbation: with the same run unperturbed): layers"
              " identical / hidden / heads / ffn |", "|---|---|---|"]  # fmt: skip
    for label, o in stability.items():
        lines.append(
            f"| {label} | {o['layers']} | {'yes' if o['layers_identical'] else 'NO'} / {o['hidden']:.3f}"
            f" / {o['heads']:.3f} / {o['ffn']:.3f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(
        json.dumps({"table": table, "stability": stability, "runs": runs}, indent=2)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
