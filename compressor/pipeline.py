"""The orchestrator. Reads like the data flow:

    recipe -> teacher -> student -> corpus -> preflight -> distill+prune -> slim -> check -> report

then export -> verify -> benchmark (deploy.py) -> gates (gates.py) -> register (zoo.py).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from compressor import schedule
from compressor.checks import (
    check_identity,
    check_param_count,
    check_slim_roundtrip,
    roundtrip_in_tempdir,
)
from compressor.data import Corpus
from compressor.deploy import HELDOUT_FILE, bench_run, export_and_verify
from compressor.distill import distill, target_shape
from compressor.environment import describe_environment, pick_device
from compressor.errors import RecipeError, RunDirError
from compressor.gates import check_gates
from compressor.importance import magnitudes, structure_scores
from compressor.masks import Masks, prune_to, select_layers
from compressor.metrics import METRICS, discrepancy_summary, plot_run, read_metrics
from compressor.recipe import Recipe, load_recipe, parse_recipe, recipe_to_dict, teacher_problems
from compressor.slim import PrunePlan, save_slim_model, slim
from compressor.teacher import (
    Teacher,
    load_teacher,
    read_teacher_config,
    sentence_transformers_files,
)
from compressor.zoo import register as zoo_register
from compressor.zoo import zoo_root

RECIPE_FILE, ENV_FILE, PLAN_FILE, SUMMARY_FILE = (
    "recipe.yaml",
    "environment.json",
    "plan.json",
    "summary.json",
)
MODEL_DIR, PLOT_FILE = "model", "discrepancy.png"


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def run(
    recipe: Recipe | str | Path,
    output: Path | None = None,
    teacher: Teacher | None = None,
    stop_after: int | None = None,
    zoo: Path | None = None,
    register: bool = True,
) -> RunResult:
    """Run a recipe end to end in a new run directory. `teacher` overrides the recipe's teacher
    (tests use it for a randomly initialised BERT-base); `stop_after` ends training early; `zoo`
    is where a verified result is registered (unless `register` is false)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check_against_teacher(recipe, teacher.model.config.to_dict() if teacher else None)
    run_dir = new_run_dir(recipe, output)
    (run_dir / RECIPE_FILE).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    return _execute(recipe, run_dir, teacher, stop_after, zoo, register)


def resume(
    run_dir: Path,
    stop_after: int | None = None,
    teacher: Teacher | None = None,
    zoo: Path | None = None,
    register: bool = True,
) -> RunResult:
    """Continue a run from its last checkpoint, with the recipe it was started with."""
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE_FILE).exists():
        raise RunDirError(f"{run_dir}: not a run directory (no {RECIPE_FILE})")
    if (run_dir / SUMMARY_FILE).exists():
        raise RunDirError(f"{run_dir}: this run already finished (see {SUMMARY_FILE})")
    return _execute(load_run_recipe(run_dir), run_dir, teacher, stop_after, zoo, register)


def _execute(
    recipe: Recipe,
    run_dir: Path,
    teacher: Teacher | None,
    stop_after: int | None,
    zoo: Path | None = None,
    register: bool = True,
) -> RunResult:
    tr = recipe.train
    if tr.threads:
        torch.set_num_threads(tr.threads)
    torch.manual_seed(tr.seed)
    device = pick_device(tr.device)
    (run_dir / ENV_FILE).write_text(json.dumps(describe_environment(device), indent=2))
    started = time.time()

    teacher = teacher or load_teacher(recipe.teacher)
    teacher.model.to(device)
    student = make_student(teacher, recipe.student.init, tr.seed)
    corpus = Corpus(recipe.data, teacher.tokenizer, tr.seed, tr.batch_size, tr.grad_accum)
    (run_dir / HELDOUT_FILE).write_text(json.dumps(corpus.heldout_texts))
    checks = preflight(recipe, teacher, student, corpus, device)

    result = distill(recipe, teacher, student, corpus, run_dir, device, stop_after)
    if result.steps_done < tr.steps:
        return RunResult(run_dir, {"stopped_at": result.steps_done})

    plan = PrunePlan.from_masks(result.masks.to("cpu"), teacher.shape)
    (run_dir / PLAN_FILE).write_text(plan.to_json())
    slim_model = slim(student.cpu(), plan)
    save_slim_model(slim_model, teacher.tokenizer, sentence_transformers_files(teacher.source_dir),
                    run_dir / MODEL_DIR)  # fmt: skip
    checks["masked_vs_slim_max_abs"] = check_slim_roundtrip(
        student, result.masks.to("cpu"), run_dir / MODEL_DIR, corpus.heldout
    )
    n_params = check_param_count(slim_model, plan.shape, teacher.vocab, teacher.has_mlm_head)

    records = read_metrics(run_dir / METRICS)
    plot_run(
        records,
        run_dir / PLOT_FILE,
        f"{recipe.name}: {teacher.shape.label()} -> {plan.shape.label()}",
    )
    summary = {
        "recipe": recipe.name,
        "teacher": teacher.name,
        "teacher_shape": teacher.shape.to_dict(),
        "student_shape": plan.shape.to_dict(),
        "teacher_params": sum(p.numel() for p in teacher.model.parameters()),
        "student_params": n_params,
        "checks": checks,
        "discrepancy": discrepancy_summary(records),
        "steps": tr.steps,
        "seconds": round(time.time() - started, 1),
        "device": str(device),
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the finished model supersedes it
    if recipe.export.onnx:
        summary = deploy(run_dir, teacher)
    check_gates(recipe.gates, run_dir)  # a miss raises CheckFailed: nothing is registered
    if recipe.export.onnx and register and recipe.zoo.register:
        summary["zoo_id"] = zoo_register(run_dir, zoo_root(zoo, recipe.zoo.dir))
    return RunResult(run_dir, summary)


def check_against_teacher(recipe: Recipe, cfg: dict | None = None) -> None:
    """Validate the target against the teacher's config before any weights load."""
    cfg = cfg or read_teacher_config(recipe.teacher)
    if cfg is not None:
        problems = teacher_problems(recipe, cfg)
        if problems:
            raise RecipeError(recipe.name, problems)


def new_run_dir(recipe: Recipe, output: Path | None) -> Path:
    root = Path(output or recipe.output.dir) / recipe.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / stamp
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = root / f"{stamp}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def latest_run(root: Path) -> Path:
    runs = sorted(root.glob(f"*/*/{RECIPE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RunDirError(f"no runs under {root}")
    return runs[-1].parent


def make_student(teacher: Teacher, init: str = "teacher", seed: int = 0) -> torch.nn.Module:
    """The student starts as an exact copy of the teacher (HomoDistil), or, for the random-init
    baseline, as the teacher's architecture with freshly initialised weights (seeded)."""
    student = copy.deepcopy(teacher.model)
    if init == "random":
        torch.manual_seed(seed)
        student.apply(student._init_weights)  # the architecture's own initialiser
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


def preflight(recipe: Recipe, teacher: Teacher, student, corpus: Corpus, device) -> dict:
    """Before training: the step-0 identity, and a throwaway slim at the target shape that must
    round-trip through save + stock reload. Export problems show in minute one, not hour ten."""
    batch = corpus.heldout.to(device)
    # the masked forward must equal the stock forward of the model the student starts as
    reference = teacher.model
    if recipe.student.init == "random":
        reference = copy.deepcopy(student).eval()  # the stock forward without dropout
    identity = check_identity(reference, student, batch, teacher.shape)
    masks = magnitude_masks_at_target(recipe, teacher)
    plan = PrunePlan.from_masks(masks, teacher.shape)
    model = teacher.model.cpu()
    diff = roundtrip_in_tempdir(
        lambda d: save_slim_model(slim(model, plan), teacher.tokenizer, {}, d),
        model,
        masks,
        corpus.heldout,
    )
    teacher.model.to(device)
    return {"step0_identity_max_abs": identity, "preflight_slim_max_abs": diff}


def magnitude_masks_at_target(recipe: Recipe, teacher: Teacher) -> Masks:
    full, target = teacher.shape, target_shape(recipe)
    entry = magnitudes(dict(teacher.model.named_parameters()))
    scores = structure_scores(teacher.model, entry, full.head_dim)
    widths = schedule.widths_at(0, full, target, "one_shot", 0, 0)
    masks = prune_to(Masks.full(full), scores, widths)
    kept = select_layers(torch.zeros(full.layers), target.layers, "uniform")
    return Masks(**{**masks.__dict__, "layers": kept, "gates": kept.float()})


def load_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run was started with."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.exists():
        raise RunDirError(f"{run_dir}: not a run directory (no {RECIPE_FILE})")
    return parse_recipe(yaml.safe_load(path.read_text()), str(path))


def deploy(run_dir: Path, teacher: Teacher | None = None, bench: bool | None = None) -> dict:
    """Export -> verify (a gate) -> benchmark for a finished run; updates summary.json."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY_FILE).exists():
        raise RunDirError(f"{run_dir}: training has not finished (no {SUMMARY_FILE})")
    recipe = load_run_recipe(run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    summary.pop("benchmark", None)
    summary.pop("export", None)  # a failed export must not leave an older success behind
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    summary["export"] = export_and_verify(recipe, run_dir)
    if recipe.bench.enabled if bench is None else bench:
        result = bench_run(recipe, run_dir, teacher or load_teacher(recipe.teacher))
        summary["benchmark"] = {
            f"{r['runtime']}_b{r['batch']}_t{r['seq']}": {
                "speedup_p50": r["speedup_p50"],
                "flop_ratio": r["flop_ratio"],
            }
            for r in result["results"]
        }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
