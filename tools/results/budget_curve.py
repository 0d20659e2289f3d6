"""How quality approaches the teacher as the training budget grows: one recipe, the same target
shape, its step budget (and pruning schedule, warm-up) scaled by each factor, over seeds, scored
on the MTEB-protocol offline suite (category averages and teacher retention).

    .venv/bin/python tools/results/budget_curve.py --out runs/budget --factors 1,2,4 \
        --baselines one_shot,st_distill \
        --reuse 1=runs/baselines/runs        # the x1 runs of `compress baselines`, if present

Each budget is `compress baselines RECIPE --baselines ... --set train.steps=...` (HomoDistil and
the trained rivals named) in its own directory, so finished runs and evaluations are reused and
re-running resumes. Each rival is set beside HomoDistil at every budget as a paired difference
(same seeds, same texts) with its bootstrap interval: does iterative pruning pull ahead as the
budget grows? Writes budget.md, budget.json and budget.png under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compressor.baselines.variants import compare, versus_cell
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
    head = ["budget", "variant", "steps", "tokens", "similarity to teacher (Spearman)", *cats,
            "retention (average)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        res = row["results"]
        tokens = res["steps"] * res["batch_size"] * res["max_length"]
        for name, m in res["mteb"]["variants"].items():
            v = res["variants"][name]
            cells = [f"x{row['factor']:g}", name, str(res["steps"]), f"{tokens / 1e6:.2f}M",
                     pm(v["similarity_spearman"]), *(pm(m["categories"][k]) for k in cats),
                     pm(m["retention"]["average"], 1, "%")]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    cells = ["", "teacher", "", "", "1", *(f"{m0['teacher']['categories'][k]:.4f}" for k in cats),
             "100%"]  # fmt: skip
    lines.append("| " + " | ".join(cells) + " |")
    seeds = rows[0]["results"]["variants"]["homodistil"]["seeds"]
    lines += ["", f"Mean ± sample std over seeds {seeds}. Categories: the mean main score of the"
              " offline MTEB-protocol suite's tasks in each (`compress eval --mteb offline`);"
              " retention: the mean over tasks of student / teacher."]  # fmt: skip
    if any(row["results"]["mteb"].get("versus") for row in rows):
        lines += ["", *versus_table(rows, cats)]
    return "\n".join(lines) + "\n"


def versus_table(rows: list[dict], cats: list[str]) -> list[str]:
    """HomoDistil minus each rival at each budget: the paired mean difference, its bootstrap
    interval and verdict, per category."""
    head = ["budget", "HomoDistil minus", *cats]
    lines = ["**HomoDistil minus each rival** (paired over seeds; mean [95% bootstrap interval],"
             " verdict)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for row in rows:
        for rival, diff in row["results"]["mteb"].get("versus", {}).items():
            cells = [f"x{row['factor']:g}", rival, *(versus_cell(diff[k]) for k in cats)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


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
    names = [n for n in rows[0]["results"]["mteb"]["variants"]
             if all(n in r["results"]["mteb"]["variants"] for r in rows)]  # fmt: skip
    for ax, key in zip(axes[0], keys, strict=True):
        for name in names:
            m = [r["results"]["mteb"]["variants"][name] for r in rows]
            stats = [x["retention"]["average"] if key == "retention" else x["categories"][key]
                     for x in m]  # fmt: skip
            ax.errorbar(steps, [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                        fmt="o-", capsize=3, label=name)  # fmt: skip
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
    ap.add_argument("--baselines", default="",
                    help="Trained rivals run at every budget beside HomoDistil, e.g."
                    " one_shot,st_distill.")  # fmt: skip
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
        variants = ["homodistil", *(b for b in args.baselines.split(",") if b)]
        results = compare(args.recipe, out, variants, seeds, [], settings, overrides,
                          jobs=args.jobs, mteb=mteb)  # fmt: skip
        rows.append({"factor": factor, "results": results})
    (args.out / "budget.json").write_text(json.dumps(rows, indent=2))
    (args.out / "budget.md").write_text(table(rows))
    plot(rows, args.out / "budget.png")
    print((args.out / "budget.md").read_text())


if __name__ == "__main__":
    main()
