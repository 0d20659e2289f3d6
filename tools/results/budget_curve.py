"""How quality approaches the teacher as the training budget grows: one recipe, the same target
shape, its step budget (and pruning schedule, warm-up) scaled by each factor, over seeds, scored
on the MTEB-protocol offline suite (category averages and teacher retention).

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


def table(rows: list[dict]) -> str:
    m0 = rows[0]["results"]["mteb"]
    cats = list(m0["teacher"]["categories"])
    head = ["budget", "steps", "tokens", "similarity to teacher (Spearman)", *cats,
            "retention (average)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        res = row["results"]
        v = res["variants"]["homodistil"]
        m = res["mteb"]["variants"]["homodistil"]
        tokens = res["steps"] * res["batch_size"] * res["max_length"]
        cells = [f"x{row['factor']:g}", str(res["steps"]), f"{tokens / 1e6:.2f}M",
                 pm(v["similarity_spearman"]), *(pm(m["categories"][k]) for k in cats),
                 pm(m["retention"]["average"], 1, "%")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["teacher", "", "", "1", *(f"{m0['teacher']['categories'][k]:.4f}" for k in cats),
             "100%"]  # fmt: skip
    lines.append("| " + " | ".join(cells) + " |")
    seeds = rows[0]["results"]["variants"]["homodistil"]["seeds"]
    lines += ["", f"HomoDistil students; mean ± sample std over seeds {seeds}. Categories: the"
              " mean main score of the offline MTEB-protocol suite's tasks in each (`compress eval"
              " --mteb offline`); retention: the mean over tasks of student / teacher."]  # fmt: skip
    return "\n".join(lines) + "\n"


def pm(x: dict, digits: int = 4, unit: str = "") -> str:
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}{unit}"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = rows[0]["results"]["mteb"]["teacher"]["categories"]
    keys = ["retention", *teacher]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    steps = [r["results"]["steps"] for r in rows]
    for ax, key in zip(axes[0], keys, strict=True):
        m = [r["results"]["mteb"]["variants"]["homodistil"] for r in rows]
        stats = [x["retention"]["average"] if key == "retention" else x["categories"][key]
                 for x in m]  # fmt: skip
        ax.errorbar(steps, [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                    fmt="o-", capsize=3, label="HomoDistil student")  # fmt: skip
        ax.axhline(100.0 if key == "retention" else teacher[key], color="black", ls="--",
                   label="teacher")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.set_title("retention % (average)" if key == "retention" else key)
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
    ap.add_argument("--mteb", default="offline", help="MTEB tasks, as `compress baselines --mteb`")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (give train.threads)")
    ap.add_argument("--reuse", action="append", default=[], metavar="FACTOR=RUNS_DIR",
                    help="Use finished runs of this factor from another comparison's runs/.")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="Another override for every run, e.g. train.threads=1.")  # fmt: skip
    args = ap.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    mteb = [t for t in args.mteb.split(",") if t]
    reuse = {float(f): Path(d) for f, d in (x.split("=", 1) for x in args.reuse)}
    settings = EvalSettings(mode="probe")
    rows = []
    for factor in factors:
        out = args.out / f"x{factor:g}"
        out.mkdir(parents=True, exist_ok=True)
        if factor in reuse and not (out / "runs").exists():
            (out / "runs").symlink_to(reuse[factor].resolve(), target_is_directory=True)
        overrides = [*(scaled(args.recipe, factor) if factor != 1 else []), *args.set]
        results = compare(args.recipe, out, ["homodistil"], seeds, [], settings, overrides,
                          jobs=args.jobs, mteb=mteb)  # fmt: skip
        rows.append({"factor": factor, "results": results})
    (args.out / "budget.json").write_text(json.dumps(rows, indent=2))
    (args.out / "budget.md").write_text(table(rows))
    plot(rows, args.out / "budget.png")
    print((args.out / "budget.md").read_text())


if __name__ == "__main__":
    main()
