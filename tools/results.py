"""The default recipe over seeds x thread counts: quality of the shipped model, mean and spread,
and how far the plan moves when only the thread count does.

    .venv/bin/python tools/results.py --out runs/results            # 3 seeds x {1, 2} threads

Each run is `compress run RECIPE --set train.seed=S --set train.threads=T` (no export, no zoo:
quality only) in its own process; finished runs under --out are reused, so re-running resumes.
Writes results.md and results.json beside the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from compressor.rundir import PLAN_FILE, SUMMARY_FILE, read_json
from compressor.stats import over_seeds

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("similarity_spearman", "neighbour_top1", "neighbour_top5")


def run_once(recipe: Path, out: Path, seed: int, threads: int) -> Path:
    root = out / f"seed{seed}-threads{threads}"
    done = [d for d in sorted(root.glob("*/*/")) if (d / SUMMARY_FILE).exists()]
    if done:
        return done[-1]
    sets = [f"train.seed={seed}", f"train.threads={threads}", "export.onnx=false",
            "bench.enabled=false"]  # fmt: skip
    cmd = [sys.executable, "-m", "compressor", "run", str(recipe), "--output", str(root),
           "--no-register", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return next(d for d in sorted(root.glob("*/*/")) if (d / SUMMARY_FILE).exists())


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
    table = {m: over_seeds([r["quality"][m] for r in runs]) for m in METRICS}
    table["discrepancy_final"] = over_seeds([r["discrepancy_final"] for r in runs])
    by = {(r["seed"], r["threads"]): r for r in runs}
    stability = {
        seed: overlap(by[(seed, threads[0])]["plan"], by[(seed, t)]["plan"])
        for seed in seeds
        for t in threads[1:]
    }
    lines = [
        f"{args.recipe.name}: {len(runs)} runs (seeds {seeds} x threads {threads})",
        "",
        "| measure | mean | std | spread / mean | per run |",
        "|---|---|---|---|---|",
    ]
    for name, v in table.items():
        each = ", ".join(f"{x:.4f}" for x in v["per_seed"])
        lines.append(
            f"| {name} | {v['mean']:.4f} | {v['std']:.4f} | {v['std'] / abs(v['mean']):.1%} | {each} |"
        )
    lines += ["", "| seed | kept layers | plan overlap, threads " + " vs ".join(map(str, threads))
              + ": layers identical / hidden / heads / ffn |", "|---|---|---|"]  # fmt: skip
    for seed, o in stability.items():
        layers = by[(seed, threads[0])]["plan"]["layers"]
        lines.append(
            f"| {seed} | {layers} | {'yes' if o['layers_identical'] else 'NO'} / {o['hidden']:.3f}"
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
