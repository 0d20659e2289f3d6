"""How quality approaches the teacher as the training budget grows: one recipe, the same target
shape, its step budget (and pruning schedule, warm-up) scaled by each factor, over seeds.

    .venv/bin/python tools/results/budget_curve.py --out runs/budget --factors 1,2,4 \
        --reuse 1=runs/baselines/runs        # the x1 runs of `compress baselines`, if present

Each budget is `compress baselines RECIPE --baselines '' --set train.steps=...` (HomoDistil
only) in its own directory, so finished runs and evaluations are reused and re-running resumes.
Writes budget.md, budget.json and budget.png under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compressor.baselines.variants import compare
from compressor.evaluate.settings import EvalSettings
from compressor.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def scaled(recipe_path: Path, factor: float) -> list[str]:
    """`--set` overrides that scale the recipe's step budget and everything measured in steps."""
    r = load_recipe(recipe_path)
    steps = round(r.train.steps * factor)
    return [
        f"train.steps={steps}",
        f"train.warmup_steps={round(r.train.warmup_steps * factor)}",
        f"pruning.start_step={round(r.pruning.start_step * factor)}",
        f"pruning.end_step={round(r.pruning.end_step * factor)}",
        f"train.checkpoint_every={min(steps, r.train.checkpoint_every)}",
    ]


def table(rows: list[dict], tasks: list[str]) -> str:
    def pm(x: dict) -> str:
        return f"{x['mean']:.4f} ± {x['std']:.4f}"

    teacher = rows[0]["results"]["teacher"]
    head = ["budget", "steps", "tokens", "similarity to teacher (Spearman)"]
    head += [f"{t} {teacher['metric'][t]}" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        res = row["results"]
        v = res["variants"]["homodistil"]
        tokens = res["steps"] * res["batch_size"] * res["max_length"]
        cells = [f"x{row['factor']:g}", str(res["steps"]), f"{tokens / 1e6:.2f}M",
                 pm(v["similarity_spearman"]), *(pm(v["score"][t]) for t in tasks)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["teacher", "", "", "1", *(f"{teacher['score'][t]:.4f}" for t in tasks)]
    lines.append("| " + " | ".join(cells) + " |")
    seeds = rows[0]["results"]["variants"]["homodistil"]["seeds"]
    lines += ["", f"Mean ± sample std over seeds {seeds}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], tasks: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["similarity_spearman", *tasks]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    steps = [r["results"]["steps"] for r in rows]
    for ax, key in zip(axes[0], keys, strict=True):
        v = [r["results"]["variants"]["homodistil"] for r in rows]
        stats = [x["similarity_spearman"] if key == keys[0] else x["score"][key] for x in v]
        ax.errorbar(steps, [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                    fmt="o-", capsize=3, label="HomoDistil student")  # fmt: skip
        teacher = rows[0]["results"]["teacher"]
        ax.axhline(1.0 if key == keys[0] else teacher["score"][key], color="black", ls="--",
                   label="teacher")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.set_title(key if key == keys[0] else f"{key} {teacher['metric'][key]}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "compare-minilm-4L256.yaml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--factors", default="1,2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="movie_retrieval,rotten_tomatoes")
    ap.add_argument("--reuse", action="append", default=[], metavar="FACTOR=RUNS_DIR",
                    help="Use finished runs of this factor from another comparison's runs/.")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="Another override for every run, e.g. train.threads=1.")  # fmt: skip
    args = ap.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = [t for t in args.tasks.split(",") if t]
    reuse = {float(f): Path(d) for f, d in (x.split("=", 1) for x in args.reuse)}
    settings = EvalSettings(mode="probe")
    rows = []
    for factor in factors:
        out = args.out / f"x{factor:g}"
        out.mkdir(parents=True, exist_ok=True)
        if factor in reuse and not (out / "runs").exists():
            (out / "runs").symlink_to(reuse[factor].resolve(), target_is_directory=True)
        overrides = [*(scaled(args.recipe, factor) if factor != 1 else []), *args.set]
        results = compare(args.recipe, out, ["homodistil"], seeds, tasks, settings, overrides)
        rows.append({"factor": factor, "results": results})
    (args.out / "budget.json").write_text(json.dumps(rows, indent=2))
    (args.out / "budget.md").write_text(table(rows, tasks))
    plot(rows, tasks, args.out / "budget.png")
    print((args.out / "budget.md").read_text())


if __name__ == "__main__":
    main()
