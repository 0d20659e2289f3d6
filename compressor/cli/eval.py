"""`compress eval` and `compress baselines`: downstream quality, and HomoDistil vs its baselines."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compressor.evaluate.settings import LR_GRID, EvalSettings


def seed_list(_ctx, _param, value: str) -> list[int]:
    try:
        return [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 0,1,2") from None


def name_list(_ctx, _param, value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def eval_options(f):
    """Settings shared by `eval` and `compare` (defaults sized for a 2-core CPU)."""
    d = EvalSettings()
    options = [
        click.option("--probe", is_flag=True,
                     help="Linear probe on frozen mean-pooled embeddings instead of fine-tuning."),
        click.option("--epochs", type=click.IntRange(1), default=d.epochs, show_default=True),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
                     help="Fine-tuning learning rate [default: the best of"
                          f" {', '.join(map(str, LR_GRID))} on the validation split]."),
        click.option("--max-length", type=click.IntRange(8, 4096), default=d.max_length,
                     show_default=True),
        click.option("--max-train", type=click.IntRange(10), default=d.max_train, show_default=True,
                     help="Stratified subsample of the train split."),
        click.option("--max-eval", type=click.IntRange(10), default=d.max_eval, show_default=True,
                     help="Cap on the validation and test splits."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def settings_from(probe, epochs, lr, max_length, max_train, max_eval) -> EvalSettings:
    return EvalSettings("probe" if probe else "finetune", max_length, epochs, lr,
                        max_train=max_train, max_eval=max_eval)  # fmt: skip


@click.command("eval")
@click.argument("target")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help="wiki_topics, rotten_tomatoes, glue/<name>, or a .csv/.jsonl file. Repeatable.",
)
@click.option(
    "--mteb",
    "mteb_tasks",
    multiple=True,
    metavar="TASK",
    help="Run TASK through mteb (its evaluators and main scores): 'offline' (the whole offline"
    " suite), an offline task name, an mteb hub task name (e.g. STSBenchmark; needs the hub), or"
    " a folder in the BEIR / classification / pair / STS layout (docs/evaluation.md). Repeatable.",
)
@click.option(
    "--seeds",
    default="0",
    callback=seed_list,
    show_default=True,
    help="Fine-tuning seeds, averaged (mean and std reported).",
)
@eval_options
@click.option("--text-column", default="text", show_default=True)
@click.option("--pair-column", default=None, help="Second text column for sentence-pair tasks.")
@click.option("--label-column", default="label", show_default=True)
@click.option("--no-teacher", is_flag=True, help="Skip the teacher's reference numbers.")
@click.option(
    "--zoo",
    "zoo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Zoo location when TARGET is a zoo id (default: $COMPRESS_ZOO or ./zoo).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")  # fmt: skip
def eval_cmd(target, tasks, mteb_tasks, seeds, probe, epochs, lr, max_length, max_train,
             max_eval, text_column, pair_column, label_column, no_teacher, zoo_dir,
             as_json) -> None:  # fmt: skip
    """Fine-tune (or linear-probe) the student of TARGET on each task and report test accuracy,
    the teacher's beside it; or, with --mteb, score student and teacher on MTEB-protocol tasks
    with the student's retention of the teacher's main score. TARGET is a run directory or a zoo
    id. Results go into the run's evaluations.json, or into the zoo entry (and show in `compress
    zoo show/compare/report` and the model card)."""
    if bool(tasks) == bool(mteb_tasks):
        raise click.UsageError("give --task or --mteb (one of them, at least one task)")
    if mteb_tasks:
        run_mteb(target, list(mteb_tasks), not no_teacher, zoo_dir, as_json)
        return
    from compressor.evaluate.evaluation import evaluate_target, format_record

    settings = settings_from(probe, epochs, lr, max_length, max_train, max_eval)
    columns = {"text_column": text_column, "pair_column": pair_column, "label_column": label_column}
    show = None if as_json else (lambda record: click.echo(format_record(record)))
    records, where = evaluate_target(target, list(tasks), settings, seeds, not no_teacher,
                                     zoo_dir, columns, on_record=show)  # fmt: skip
    if as_json:
        click.echo(json.dumps(records, indent=2))
    click.echo(f"recorded in {where}", err=True)


def run_mteb(target: str, names: list[str], with_teacher: bool, zoo_dir, as_json: bool) -> None:
    from compressor.evaluate.mteb_eval import (
        category_summary,
        evaluate_mteb_target,
        format_record,
        format_summary,
        json_view,
    )

    show = None if as_json else (lambda record: click.echo(format_record(record)))
    records, where = evaluate_mteb_target(target, names, with_teacher, zoo_dir, on_record=show)
    if as_json:
        click.echo(json.dumps(json_view(records), indent=2))
    else:
        click.echo(format_summary(category_summary(records)))
    click.echo(f"recorded in {where}", err=True)


@click.command("baselines")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--baselines",
    default="slice,one_shot,distilbert,random,st_distill",
    callback=name_list,
    show_default=True,
    help="Variants to run beside HomoDistil.",
)
@click.option("--seeds", default="0,1,2", callback=seed_list, show_default=True)
@click.option(
    "--mteb",
    "mteb_tasks",
    default="offline",
    callback=name_list,
    show_default=True,
    help="MTEB tasks every student (and the teacher) is scored on, comma-separated, as in"
    " `compress eval --mteb` ('offline': the offline suite; '' for none).",
)
@click.option(
    "--tasks",
    default="",
    callback=name_list,
    help="Also fine-tune (or --probe) each student on these `compress eval --task` tasks, e.g."
    " movie_retrieval,rotten_tomatoes.",
)
@eval_options
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a key of RECIPE for every variant, e.g. pruning.end_step=50.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory (runs, results.md/json, plots). Re-running resumes.")  # fmt: skip
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trainings at once, each in its own process (set train.threads to match).")  # fmt: skip
def baselines_cmd(recipe, baselines, seeds, mteb_tasks, tasks, probe, epochs, lr, max_length,
                  max_train, max_eval, overrides, out, jobs) -> None:  # fmt: skip
    """Run HomoDistil (RECIPE) and the baselines at the same shape and token budget over SEEDS,
    evaluate every student, and write a results table and plots."""
    from compressor.baselines.variants import compare
    from compressor.rundir import (
        BASELINES_CATEGORIES_PNG,
        BASELINES_CURVES_PNG,
        BASELINES_RESULTS_MD,
        BASELINES_SCORES_PNG,
    )

    settings = settings_from(probe, epochs, lr, max_length, max_train, max_eval)
    variants = ["homodistil", *[b for b in baselines if b != "homodistil"]]
    if not mteb_tasks and not tasks:
        raise click.UsageError(
            "give --mteb or --tasks (the students need something to be scored on)"
        )
    compare(recipe, out, variants, seeds, tasks, settings, list(overrides), jobs, mteb_tasks)
    click.echo((out / BASELINES_RESULTS_MD).read_text())
    plots = [out / BASELINES_CURVES_PNG]
    plots += [out / BASELINES_SCORES_PNG] if tasks else []
    plots += [out / BASELINES_CATEGORIES_PNG] if mteb_tasks else []
    click.echo("plots: " + ", ".join(map(str, plots)))
