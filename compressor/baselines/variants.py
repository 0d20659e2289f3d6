"""`compress baselines`: HomoDistil against the usual ways to get a student of the same shape, at the
same token budget, over several seeds, measured by the tool itself.

    recipe -> variants x seeds -> run each (resumable) -> evaluate each -> table + plots

Variants are the recipe with a few keys changed (`VARIANTS`), so a baseline differs from HomoDistil
in nothing but what it names: same teacher, text, target, losses, steps, batch and seed.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml

from compressor import pipeline
from compressor.baselines.st_distill import st_distill
from compressor.checkpoint import has_checkpoint
from compressor.errors import CompressError, RecipeError
from compressor.evaluate.evaluation import recorded_or_evaluated
from compressor.evaluate.settings import EvalSettings
from compressor.metrics import read_metrics
from compressor.recipe import (
    Recipe,
    load_recipe,
    parse_recipe,
    recipe_to_dict,
    require_same_recipe,
    with_overrides,
)
from compressor.rundir import (
    BASELINES_CATEGORIES_PNG,
    BASELINES_CURVES_PNG,
    BASELINES_RESULTS_JSON,
    BASELINES_RESULTS_MD,
    BASELINES_SCORES_PNG,
    METRICS_FILE,
    RECIPE_FILE,
    SUMMARY_FILE,
    read_summary,
)
from compressor.stats import over_seeds, paired_difference
from compressor.zoo.mteb_scores import MODE, category_summary, retention

# what each variant changes in the recipe (HomoDistil is the recipe itself)
ONE_SHOT = {"schedule": "one_shot", "start_step": 0}
TRUNCATE = {**ONE_SHOT, "importance": "truncate", "layer_selection": "uniform"}
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "homodistil": {},
    "slice": {"pruning": TRUNCATE},  # no training: see UNTRAINED
    "one_shot": {"pruning": ONE_SHOT},
    "distilbert": {"pruning": TRUNCATE},
    "random": {"student": {"init": "random"}, "pruning": TRUNCATE},
    # trained by sentence-transformers, not by the pipeline: see ST_TRAINED
    "st_distill": {"pruning": TRUNCATE},
}
UNTRAINED = {"slice"}
ST_TRAINED = {"st_distill"}  # evaluate/st_distill.py
DESCRIPTIONS = {
    "homodistil": "iterative pruning while distilling (the recipe)",
    "slice": "the teacher's evenly spaced layers and first-k widths, no training at all",
    "one_shot": "(a) prune to the target at step 0 by sensitivity, then distil",
    "distilbert": "(b) DistilBERT-style init: evenly spaced layers, first-k widths, then distil",
    "random": "(c) random init at the target shape, then distil",
    "st_distill": "(d) the sentence-transformers distillation recipe: the slice, trained with"
    " its MSELoss on the teacher's (PCA-projected) sentence embeddings by its own trainer",
}


def variant_recipe(base: Recipe, variant: str, seed: int) -> Recipe:
    """The base recipe with the variant's changes, the seed, and no export (quality only)."""
    if variant not in VARIANTS:
        raise RecipeError("--baselines", [f"unknown variant {variant!r} ({', '.join(VARIANTS)})"])
    raw = recipe_to_dict(base)
    if variant in UNTRAINED | ST_TRAINED:
        # the recipe's losses and schedule play no part in these: they take the defaults, so
        # that a change to them does not call for new runs of these variants
        raw["distill"] = {}
        raw["pruning"] = {"structures": raw["pruning"]["structures"], "end_step": 0}
    for section, changes in VARIANTS[variant].items():
        raw[section] = {**raw.get(section, {}), **changes}
    raw["name"] = f"{variant}-s{seed}"
    raw["train"]["seed"] = seed
    raw["export"]["onnx"] = False
    raw["bench"]["enabled"] = False
    return parse_recipe(raw, f"{base.name} [{variant}, seed {seed}]")


def run_variant(variant: str, recipe: Recipe, runs_root: Path) -> Path:
    """Run (or resume, or reuse) one variant; returns its finished run directory."""
    root = runs_root / recipe.name
    for d in sorted(root.glob("*/")):
        if (d / SUMMARY_FILE).exists():
            return require_same_recipe(d, recipe)
        if has_checkpoint(d):
            return pipeline.resume(require_same_recipe(d, recipe)).run_dir
    if variant in UNTRAINED:
        return pipeline.untrained_slice(recipe, runs_root).run_dir
    if variant in ST_TRAINED:
        return st_distill(recipe, runs_root).run_dir
    return pipeline.run(recipe, runs_root).run_dir


def scored(run_dir: Path, recipe: Recipe, mteb: list[str]) -> list[dict]:
    """The run's MTEB records of the tasks (scored now only where it lacks them), at the
    recipe's thread count."""
    if not mteb:
        return []
    import torch

    from compressor.evaluate.mteb_eval import recorded_or_scored

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    return recorded_or_scored(run_dir, mteb)


def trained(variant: str, recipe: Recipe, runs_root: Path,
            mteb: list[str] = ()) -> tuple[str, int] | None:  # fmt: skip
    """run_variant, then its MTEB scores, in a worker process: None, or the error's message and
    exit code (a typed error may not survive pickling back to the parent)."""
    try:
        scored(run_variant(variant, recipe, runs_root), recipe, list(mteb))
    except CompressError as err:
        return f"{recipe.name}: {err}", err.exit_code
    return None


def train_all(plan: list[tuple[str, int, Recipe]], runs_root: Path, jobs: int,
              mteb: list[str] = ()) -> None:  # fmt: skip
    """Train (or resume, or reuse) every run of the plan and score it on the MTEB tasks, `jobs`
    at a time, each in its own process, in plan order. The first failure stops the rest and is
    raised."""
    if any(r.train.threads is None for v, _, r in plan if v not in UNTRAINED):
        raise RecipeError("--jobs", [f"--jobs {jobs} runs {jobs} trainings at once: give each "
                                     "its threads, e.g. --set train.threads=1"])  # fmt: skip
    ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        futures = [pool.submit(trained, v, r, runs_root, list(mteb)) for v, _, r in plan]
        for future in as_completed(futures):
            if (failure := future.result()) is not None:
                pool.shutdown(cancel_futures=True)
                err = CompressError(failure[0])
                err.exit_code = failure[1]
                raise err


def compare(
    recipe_path: Path,
    out: Path,
    variants: list[str],
    seeds: list[int],
    tasks: list[str],
    settings: EvalSettings,
    overrides: list[str] = (),
    jobs: int = 1,
    mteb: list[str] = (),
) -> dict:
    base = with_overrides(load_recipe(recipe_path), list(overrides))
    # seed-major: an interrupted comparison has every variant at the first seeds
    plan = [(v, s, variant_recipe(base, v, s)) for s in seeds for v in variants]  # validate all
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).write_text(yaml.safe_dump(recipe_to_dict(base), sort_keys=False))
    if jobs > 1:
        train_all(plan, out / "runs", jobs, mteb)
    rows = []
    for variant, seed, recipe in plan:
        run_dir = run_variant(variant, recipe, out / "runs")
        evals = {}
        for task in tasks:
            evals[task] = recorded_or_evaluated(run_dir, task, settings, [seed])
        records = scored(run_dir, recipe, list(mteb))
        summary = read_summary(run_dir).to_dict()
        rows.append(
            {
                "variant": variant,
                "seed": seed,
                "run_dir": str(run_dir),
                "params": summary["student_params"],
                "discrepancy_final": summary["discrepancy"]["final"],
                "curve": [
                    (r["step"], r["discrepancy"])
                    for r in read_metrics(run_dir / METRICS_FILE)
                    if "discrepancy" in r
                ],
                "score": {t: e["student"]["mean"] for t, e in evals.items()},
                "metric": {t: e["metric"] for t, e in evals.items()},
                "teacher_score": {t: e["teacher"]["mean"] for t, e in evals.items()},
                "quality": summary.get("quality", {}),
                "teacher_params": summary["teacher_params"],
                "mteb": {r["task"]: mteb_cell(r) for r in records},
            }
        )
    results = aggregate(rows, base, settings, tasks)
    (out / BASELINES_RESULTS_JSON).write_text(json.dumps({**results, "runs": rows}, indent=2))
    (out / BASELINES_RESULTS_MD).write_text(markdown_table(results))
    plot_curves(rows, out / BASELINES_CURVES_PNG)
    if tasks:
        plot_scores(results, out / BASELINES_SCORES_PNG)
    if mteb:
        plot_categories(results, out / BASELINES_CATEGORIES_PNG)
    return results


# ---------------------------------------------------------------------------- aggregation (pure)


AVERAGE = "average"  # over every task of the suite


def mteb_cell(record: dict) -> dict:
    """What a comparison keeps of one MTEB record: the task's category, its main score's name,
    and the student's and the teacher's main scores."""
    return {"category": record["category"], "metric": record["metric"],
            "student": record["student"]["mean"], "teacher": record["teacher"]["mean"]}  # fmt: skip


def category_means(cells: dict[str, dict]) -> dict[str, dict]:
    """Per category, then over all tasks (`average`): the mean main score of student and teacher
    and the mean of the tasks' retentions (percent), as the zoo summarises an entry's records."""
    records = [{"task": t, "mode": MODE, "category": c["category"],
                "student": {"mean": c["student"]}, "teacher": {"mean": c["teacher"]},
                "retention": retention(c["student"], c["teacher"])}
               for t, c in cells.items()]  # fmt: skip
    rows = {row["category"]: row for row in category_summary(records)}
    return rows if AVERAGE in rows else {**rows, AVERAGE: next(iter(rows.values()))}


def mteb_aggregate(rows: list[dict]) -> dict:
    """Per variant: each task's and each category's main score over seeds, and the retention;
    then HomoDistil against each other variant, paired by seed, with a bootstrap interval."""
    first = rows[0]["mteb"]
    teacher = {"tasks": {t: c["teacher"] for t, c in first.items()},
               "categories": {k: v["teacher"] for k, v in category_means(first).items()},
               "metric": {t: c["metric"] for t, c in first.items()},
               "category_of": {t: c["category"] for t, c in first.items()}}  # fmt: skip
    per_seed: dict[str, dict[int, dict]] = {}
    for r in rows:
        per_seed.setdefault(r["variant"], {})[r["seed"]] = r["mteb"]
    variants = {}
    for v, by_seed in per_seed.items():
        means = [category_means(cells) for cells in by_seed.values()]
        variants[v] = {
            "seeds": list(by_seed),
            "tasks": {t: over_seeds([cells[t]["student"] for cells in by_seed.values()])
                      for t in first},
            "categories": {k: over_seeds([m[k]["student"] for m in means]) for k in means[0]},
            "retention": {k: over_seeds([m[k]["retention"] for m in means]) for k in means[0]},
        }  # fmt: skip
    versus = {}
    if "homodistil" in per_seed:
        ours = per_seed["homodistil"]
        for v, by_seed in per_seed.items():
            seeds = [s for s in ours if s in by_seed]
            if v == "homodistil" or not seeds:
                continue
            a = [category_means(ours[s]) for s in seeds]
            b = [category_means(by_seed[s]) for s in seeds]
            versus[v] = {k: paired_difference([m[k]["student"] for m in a],
                                              [m[k]["student"] for m in b]) for k in a[0]}  # fmt: skip
    return {"teacher": teacher, "variants": variants, "versus": versus}


def aggregate(rows: list[dict], base: Recipe, settings: EvalSettings, tasks: list[str]) -> dict:
    variants: dict[str, dict] = {}
    for v in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == v]
        variants[v] = {
            "description": DESCRIPTIONS[v],
            "params": mine[0]["params"],
            "seeds": [r["seed"] for r in mine],
            "discrepancy_final": over_seeds([r["discrepancy_final"] for r in mine]),
            "score": {t: over_seeds([r["score"][t] for r in mine]) for t in tasks},
            "similarity_spearman": over_seeds(
                [r["quality"].get("similarity_spearman", float("nan")) for r in mine]
            ),
        }
    return {
        "recipe": base.name,
        "target": base.target.model_dump(),
        "steps": base.train.steps,
        "batch_size": base.train.batch_size,
        "max_length": base.data.max_length,
        "eval": settings.to_dict(),
        "teacher": {
            "params": rows[0]["teacher_params"],
            "score": rows[0]["teacher_score"],
            "metric": rows[0]["metric"],
        },
        "variants": variants,
        **({"mteb": mteb_aggregate(rows)} if rows[0].get("mteb") else {}),
    }


def markdown_table(res: dict) -> str:
    t = res["teacher"]
    tasks = list(t["score"])
    head = ["variant", "params", "similarity to teacher (Spearman)", "held-out discrepancy"]
    head += [f"{k} {t['metric'][k]}" for k in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = ["teacher", f"{t['params'] / 1e6:.1f}M", "1", "0"]
    lines.append("| " + " | ".join(cells + [f"{t['score'][k]:.4f}" for k in tasks]) + " |")

    seeds = next(iter(res["variants"].values()))["seeds"]

    def pm(x: dict) -> str:
        return spread(x["mean"], x["std"], len(seeds))

    for name, v in res["variants"].items():
        cells = [name, f"{v['params'] / 1e6:.1f}M", pm(v["similarity_spearman"]),
                 pm(v["discrepancy_final"]), *(pm(v["score"][k]) for k in tasks)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Mean ± sample std over seeds {seeds}; {res['steps']} steps x {res['batch_size']}"
        f" sequences x {res['max_length']} tokens for every trained variant (`slice` is not"
        " trained). Similarity: Spearman of the pairwise cosine similarities of student and"
        " teacher embeddings on held-out text never trained on."
        + (f" Downstream: test split; classification by {res['eval']['mode']} (train"
           f" {res['eval']['max_train']}, eval {res['eval']['max_eval']}), retrieval zero-shot."
           if tasks else "")
    )  # fmt: skip
    if "mteb" in res:
        lines += ["", mteb_markdown(res["mteb"], len(seeds))]
    return "\n".join(lines) + "\n"


def signed(x: float) -> str:
    return f"{x:+.4f}"


def spread(mean: float, std: float, seeds: int, digits: int = 4, unit: str = "") -> str:
    """`mean ± std`, or the mean alone over one seed (a spread of one value is not 0: unknown)."""
    if seeds < 2:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit}"


def versus_cell(d: dict) -> str:
    """A paired difference: mean [interval] verdict (one seed: no interval)."""
    if d["low"] is None:
        return f"{signed(d['mean'])} ({d['verdict']})"
    return f"{signed(d['mean'])} [{signed(d['low'])}, {signed(d['high'])}] {d['verdict']}"


def mteb_markdown(m: dict, seeds: int) -> str:
    """The MTEB-protocol tables: category averages per variant (with retention), HomoDistil
    against each variant paired by seed, and every task."""
    t = m["teacher"]
    cats = list(t["categories"])
    head = ["variant", *cats, f"{AVERAGE} retention"]
    lines = ["**MTEB-protocol suite, main score averaged per category** (mean ± std over seeds;"
             " the last column: mean teacher retention over tasks, percent)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| teacher | " + " | ".join(f"{t['categories'][k]:.4f}" for k in cats) + " | 100 |"]  # fmt: skip
    for name, v in m["variants"].items():
        c, r = v["categories"], v["retention"][AVERAGE]
        cells = [spread(c[k]["mean"], c[k]["std"], seeds) for k in cats]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {spread(r['mean'], r['std'], seeds, 1, '%')} |")  # fmt: skip
    if m["versus"]:
        any_pair = next(iter(next(iter(m["versus"].values())).values()))
        lines += ["", f"**HomoDistil minus each variant**, paired by seed (same seed, same texts):"
                  f" mean difference [{any_pair['level']:.0%} bootstrap interval over"
                  f" {any_pair['n']} seeds], and whether HomoDistil is ahead, behind, or inside"
                  " the noise (the interval holds 0)", "",
                  "| HomoDistil vs | " + " | ".join(cats) + " |", "|" + "---|" * (len(cats) + 1)]  # fmt: skip
        for name, diffs in m["versus"].items():
            cells = [versus_cell(diffs[k]) for k in cats]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tasks = list(t["tasks"])
    lines += ["", "**Every task** (main score, mean ± std over seeds)", "",
              "| variant | " + " | ".join(f"{k} ({t['category_of'][k]}, {t['metric'][k]})"
                                         for k in tasks) + " |",
              "|" + "---|" * (len(tasks) + 1),
              "| teacher | " + " | ".join(f"{t['tasks'][k]:.4f}" for k in tasks) + " |"]  # fmt: skip
    for name, v in m["variants"].items():
        cells = [spread(v["tasks"][k]["mean"], v["tasks"][k]["std"], seeds) for k in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def plot_categories(res: dict, out: Path) -> None:
    """Per MTEB category, each variant's mean main score with its seed spread (std) and the
    teacher's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = res["mteb"]
    cats = list(m["teacher"]["categories"])
    fig, axes = plt.subplots(1, len(cats), figsize=(3.2 * len(cats), 3.8), squeeze=False)
    names = list(m["variants"])
    for ax, k in zip(axes[0], cats, strict=True):
        stats = [m["variants"][v]["categories"][k] for v in names]
        ax.bar(range(len(names)), [x["mean"] for x in stats], yerr=[x["std"] for x in stats],
               capsize=3, color=[f"C{i}" for i in range(len(names))])  # fmt: skip
        ax.axhline(m["teacher"]["categories"][k], color="black", ls="--", label="teacher")
        low = min(x["mean"] - x["std"] for x in stats)
        ax.set_ylim(bottom=max(0.0, low - 0.1 * abs(low)))
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(k)
    axes[0][0].set_ylabel("main score (mean over tasks)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_curves(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for v in dict.fromkeys(r["variant"] for r in rows):
        curves = [dict(r["curve"]) for r in rows if r["variant"] == v]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        mean = [statistics.fmean(x) for x in values]
        ax.plot(steps, mean, label=v, color=colors[v])
        ax.fill_between(steps, [min(x) for x in values], [max(x) for x in values],
                        color=colors[v], alpha=0.2)  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out discrepancy")
    ax.set_title("teacher-student discrepancy: mean over seeds, band = min..max")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_scores(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(res["teacher"]["score"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        t = res["teacher"]
        ax.scatter([t["params"] / 1e6], [t["score"][task]], marker="*", s=150, color="black",
                   label="teacher")  # fmt: skip
        for i, (name, v) in enumerate(res["variants"].items()):
            a = v["score"][task]
            x = v["params"] / 1e6 * (1 + 0.02 * (i - 1.5))  # same size: spread the markers a bit
            ax.errorbar([x], [a["mean"]], yerr=[a["std"]], fmt="o", capsize=3, label=name)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(f"test {t['metric'][task]}")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
