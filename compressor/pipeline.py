"""The orchestrator. Reads like the data flow:

recipe -> teacher -> student -> corpus -> preflight -> distill+prune -> slim -> check -> report
       -> export -> verify -> benchmark (deploy/stages.py) -> gates (gates.py) -> register (zoo/)
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoModel, AutoModelForMaskedLM

from compressor import distributed
from compressor.checkpoint import (
    Checkpoint,
    has_checkpoint,
    load_checkpoint,
    remove_checkpoints,
)
from compressor.checks import (
    check_finite_weights,
    check_identity,
    check_param_count,
    check_slim_roundtrip,
    roundtrip_in_tempdir,
)
from compressor.data import Corpus
from compressor.deploy.stages import deploy
from compressor.distill import distill, evaluate
from compressor.environment import describe_environment, pick_device
from compressor.errors import Interrupted, RecipeError, RunDirError, resume_command
from compressor.forward import mean_pool
from compressor.gates import check_gates, evaluate_for_gates
from compressor.losses import HiddenMaps, prediction_kl
from compressor.metrics import MetricsLog, discrepancy_summary, plot_run, read_metrics
from compressor.prune.importance import magnitudes, structure_scores, truncation_scores
from compressor.prune.masks import Masks, prune_to, select_layers
from compressor.prune.schedule import Schedule
from compressor.prune.slim import PrunePlan, save_slim_model, slim
from compressor.quality import similarity_agreement
from compressor.recipe import (
    DataSpec,
    Recipe,
    load_recipe,
    load_run_recipe,
    recipe_to_dict,
    teacher_problems,
    with_overrides,
)
from compressor.rundir import (
    ENV_FILE,
    HELDOUT_FILE,
    METRICS_FILE,
    MODEL_DIR,
    PLAN_FILE,
    PLOT_FILE,
    RECIPE_FILE,
    START_FILES,
    SUMMARY_FILE,
    RunSummary,
    lock_run_dir,
    new_run_dir,
    read_summary,
    require_not_entry,
    require_run_dir,
    write_summary,
)
from compressor.teacher import (
    Teacher,
    load_teacher,
    read_teacher_config,
    sentence_transformers_files,
)
from compressor.train.state import make_student
from compressor.zoo import store as zoo_store


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
    overrides: list[str] = (),
    allow_large: bool = False,
) -> RunResult:
    """Run a recipe end to end in a new run directory. `teacher` overrides the recipe's teacher
    (tests use it for a randomly initialised BERT-base); `stop_after` ends training early; `zoo`
    is where a verified result is registered (unless `register` is false); `overrides` are
    `section.key=value` changes to the recipe (`compress run --set`); `allow_large` skips the
    memory check against this machine. Under torchrun every process calls it; rank 0 creates the
    run directory and writes every file."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    recipe = with_overrides(recipe, list(overrides))
    cfg = teacher.model.config.to_dict() if teacher else None
    check_against_teacher(recipe, cfg, allow_large)
    check_processes(recipe)
    with distributed.session(pick_device(recipe.train.device)) as device:
        main = distributed.is_main()
        run_dir = distributed.from_main(create_run_dir(recipe, output) if main else None)
        try:
            if main:
                (run_dir / RECIPE_FILE).write_text(
                    yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
                )
            return _execute(recipe, run_dir, device, teacher, stop_after, zoo, register)
        except Interrupted:
            raise  # the user stopped it: the directory stays, to resume from step 0
        except BaseException:
            if main:
                discard_if_unstarted(run_dir)
            raise


def create_run_dir(recipe: Recipe, output: Path | None) -> Path:
    try:
        return new_run_dir(Path(output or recipe.output.dir), recipe.name)
    except OSError as err:
        raise RunDirError(f"cannot create a run directory under {output or recipe.output.dir}"
                          f" ({err.strerror})") from None  # fmt: skip


def check_processes(recipe: Recipe) -> None:
    """Each step's micro-batches are shared out evenly, so the global batch is the recipe's on
    any number of processes: `grad_accum` must be a multiple of their number."""
    n, accum = distributed.world_size(), recipe.train.grad_accum
    if accum % n:
        raise RecipeError(recipe.name, [
            f"train.grad_accum: {accum} micro-batches a step cannot be shared evenly by {n}"
            f" processes; use a multiple of {n} (train.batch_size is one micro-batch, so the"
            " global batch is batch_size x grad_accum whatever the number of processes)"
        ])  # fmt: skip


def check_same_processes(ckpt: Checkpoint | None, run_dir: Path) -> None:
    """A checkpoint resumes with as many processes as wrote it: it holds every process's random
    state, and each step's micro-batches are shared out by that number."""
    n = distributed.world_size()
    if ckpt is None or ckpt.world_size == n:
        return
    raise RunDirError(
        f"{run_dir}: its checkpoint (step {ckpt.step}) was written by {ckpt.world_size}"
        f" process(es), and this resume has {n}; a run resumes with as many processes as it"
        f" was trained with (on one machine: {resume_command(run_dir, ckpt.world_size)})"
    )


def discard_if_unstarted(run_dir: Path) -> bool:
    """Remove a new run directory whose setup failed (teacher, data, preflight) before training
    wrote anything, and its recipe folder if that is left empty. Nothing to resume is lost: a
    directory holding more than the start files is kept."""
    present = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if not present <= set(START_FILES):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()  # only when empty
    return True


def resume(
    run_dir: Path,
    stop_after: int | None = None,
    teacher: Teacher | None = None,
    zoo: Path | None = None,
    register: bool = True,
) -> RunResult:
    """Continue a run from its last checkpoint, with the recipe it was started with."""
    run_dir = require_run_dir(require_not_entry(run_dir))
    with lock_run_dir(run_dir) if distributed.is_main() else contextlib.nullcontext():
        if (run_dir / SUMMARY_FILE).exists():
            return finish_deployment(run_dir, teacher, zoo, register)
        # none left good, or written by another number of processes: say so before loading more
        check_same_processes(load_checkpoint(run_dir, warn=lambda _: None), run_dir)
        recipe = load_run_recipe(run_dir)
        check_processes(recipe)
        with distributed.session(pick_device(recipe.train.device)) as device:
            return _execute(recipe, run_dir, device, teacher, stop_after, zoo, register)


def _execute(
    recipe: Recipe,
    run_dir: Path,
    device: torch.device,
    teacher: Teacher | None,
    stop_after: int | None,
    zoo: Path | None = None,
    register: bool = True,
) -> RunResult:
    try:
        return _stages(recipe, run_dir, device, teacher, stop_after, zoo, register)
    except KeyboardInterrupt as err:  # a second Ctrl-C, or one outside the training loop
        raise interrupted(run_dir, err) from None


def interrupted(run_dir: Path, err: KeyboardInterrupt) -> Interrupted:
    """What a Ctrl-C or SIGTERM (in `err.args`) outside the training loop stopped."""
    signum = int(err.args[0]) if err.args else signal.SIGINT
    trained = (run_dir / SUMMARY_FILE).exists()
    return Interrupted(
        run_dir, has_checkpoint(run_dir), signum, distributed.world_size(), trained=trained
    )


def _stages(
    recipe: Recipe,
    run_dir: Path,
    device: torch.device,
    teacher: Teacher | None,
    stop_after: int | None,
    zoo: Path | None = None,
    register: bool = True,
) -> RunResult:
    tr = recipe.train
    if tr.threads:
        torch.set_num_threads(tr.threads)
    torch.manual_seed(tr.seed)
    main = distributed.is_main()  # the other processes only train
    if main:
        environment = describe_environment(device, distributed.world_size())
        (run_dir / ENV_FILE).write_text(json.dumps(environment, indent=2))
    started = time.time()

    teacher = teacher or load_teacher(recipe.teacher)
    teacher.model.to(device)
    student = make_student(teacher, recipe.student.init, tr.seed)
    corpus = Corpus(recipe.data, teacher.tokenizer, tr.seed, tr.batch_size, tr.grad_accum)
    if main:
        (run_dir / HELDOUT_FILE).write_text(json.dumps(corpus.heldout_texts))
    checks = preflight(recipe, teacher, student, corpus, device) if main else {}

    result = distill(recipe, teacher, student, corpus, run_dir, device, stop_after)
    if result.steps_done < tr.steps:
        return RunResult(run_dir, {"stopped_at": result.steps_done})
    if not main:
        return RunResult(run_dir, {"rank": distributed.rank(), "steps": result.steps_done})

    check_finite_weights(student, "the trained student")
    masks = result.masks.to("cpu")
    if result.units is None:
        plan = cut_plan = PrunePlan.from_masks(masks, teacher.shape)
    else:  # a progressively slimmed student: plan.json in the teacher's indices
        plan = PrunePlan.from_masks(result.units.in_teacher(masks, teacher.shape), teacher.shape)
        cut_plan = PrunePlan.from_masks(masks, masks.tensor_shape())
    records = read_metrics(run_dir / METRICS_FILE)
    outcome = Outcome(student.cpu(), masks, plan, cut_plan, checks, records, tr.steps, started,
                      str(device))  # fmt: skip
    ship(recipe, run_dir, teacher, corpus, outcome)
    plot_run(records, run_dir / PLOT_FILE,
             f"{recipe.name}: {teacher.shape.label()} -> {plan.shape.label()}")  # fmt: skip
    return deploy_and_register(recipe, run_dir, teacher, zoo, register)


@dataclass
class Outcome:
    """What a run hands to its tail: the masked student, its plans (in the teacher's indices, and
    in the student's own, which differ once a progressive slim cut it), and what the summary
    records of how it was made."""

    student: torch.nn.Module
    masks: Masks
    plan: PrunePlan
    cut_plan: PrunePlan
    checks: dict
    records: list[dict]
    steps: int
    started: float
    device: str


def ship(
    recipe: Recipe, run_dir: Path, teacher: Teacher, corpus: Corpus, out: Outcome
) -> RunSummary:
    """The tail of every run, trained or not: plan.json, the slim model saved and reloaded the way
    users load it (the round trip checked against the masked student), its parameter count and
    shipped quality, summary.json."""
    plan, checks = out.plan, out.checks
    (run_dir / PLAN_FILE).write_text(plan.to_json())
    slim_model = slim(out.student, out.cut_plan, score_head_dim=teacher.shape.head_dim)
    save_slim_model(slim_model, teacher.tokenizer, sentence_transformers_files(teacher.source_dir),
                    run_dir / MODEL_DIR)  # fmt: skip
    checks["masked_vs_slim_max_abs"] = check_slim_roundtrip(
        out.student, out.masks, run_dir / MODEL_DIR, corpus.heldout
    )
    n_params = check_param_count(slim_model, plan.shape, teacher.vocab, teacher.has_mlm_head)
    summary = RunSummary(
        recipe=recipe.name,
        teacher=teacher.name,
        teacher_shape=teacher.shape.to_dict(),
        student_shape=plan.shape.to_dict(),
        teacher_params=sum(p.numel() for p in teacher.model.parameters()),
        student_params=n_params,
        checks=checks,
        discrepancy=discrepancy_summary(out.records),
        quality=shipped_quality(run_dir / MODEL_DIR, teacher, corpus.quality_texts, recipe.data),
        steps=out.steps,
        seconds=round(time.time() - out.started, 1),
        device=out.device,
    )
    write_summary(run_dir, summary)
    return summary


def deploy_and_register(
    recipe: Recipe, run_dir: Path, teacher: Teacher | None, zoo: Path | None, register: bool
) -> RunResult:
    """The stages after summary.json: export -> verify -> benchmark, the gates, registration."""
    remove_checkpoints(run_dir)  # the finished model supersedes them
    if recipe.export.onnx:
        deploy(run_dir, teacher)
    evaluate_for_gates(recipe.gates, run_dir, teacher)  # the quality gate's evaluation, recorded
    check_gates(recipe.gates, run_dir)  # a miss raises CheckFailed: nothing is registered
    summary = read_summary(run_dir)  # with the deployment stages' results
    if recipe.export.onnx and register and recipe.zoo.register:
        summary.zoo_id = zoo_store.register(run_dir, zoo_store.zoo_root(zoo, recipe.zoo.dir))
    return RunResult(run_dir, summary.to_dict())


def finish_deployment(
    run_dir: Path, teacher: Teacher | None, zoo: Path | None, register: bool
) -> RunResult:
    """Resume a run whose training finished (summary.json) but whose export -> verify ->
    benchmark did not (stopped or killed there: the summary holds no export yet): run those
    stages and the registration again. A run with nothing left to do is refused."""
    recipe = load_run_recipe(run_dir)
    if not (recipe.export.onnx and read_summary(run_dir).export is None):
        raise RunDirError(
            f"{run_dir}: this run already finished (see {SUMMARY_FILE}); if it is not in the"
            f" zoo yet, register it with: compress zoo add {run_dir}"
        )
    if not distributed.is_main():
        return RunResult(run_dir, {"rank": distributed.rank()})  # rank 0 deploys
    try:
        return deploy_and_register(recipe, run_dir, teacher, zoo, register)
    except KeyboardInterrupt as err:
        raise interrupted(run_dir, err) from None


def check_against_teacher(
    recipe: Recipe, cfg: dict | None = None, allow_large: bool = False
) -> None:
    """Validate the target against the teacher's config, and the memory the training needs
    against this machine's (unless `allow_large`), before any weights load."""
    from compressor.plan_report import resource_problems

    cfg = cfg or read_teacher_config(recipe.teacher)
    if cfg is not None:
        problems = teacher_problems(recipe, cfg) or resource_problems(recipe, cfg, allow_large)
        if problems:
            raise RecipeError(recipe.name, problems)


@torch.no_grad()
def shipped_quality(model_dir: Path, teacher: Teacher, texts: list[str], data: DataSpec) -> dict:
    """Agreement of the saved slim model (loaded with the stock class, as users load it) with the
    teacher on held-out texts never trained on: the map-free similarity measures of quality.py,
    and for MLM teachers the KL of MLM predictions over real tokens."""
    if len(texts) < 3:
        return {}
    cls = AutoModelForMaskedLM if teacher.has_mlm_head else AutoModel
    student = cls.from_pretrained(model_dir).eval()
    reference = teacher.model.cpu()
    embeddings: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    kl = []
    for i in range(0, len(texts), 32):
        enc = teacher.tokenizer(texts[i : i + 32], padding=True, truncation=True,
                                max_length=data.max_length, return_tensors="pt")  # fmt: skip
        att = enc["attention_mask"]
        for who, model in (("student", student), ("teacher", reference)):
            out = model(**enc, output_hidden_states=True)
            embeddings[who].append(mean_pool(out.hidden_states[-1], att))
            if teacher.has_mlm_head:
                embeddings[f"{who}_logits"] = out.logits
        if teacher.has_mlm_head:
            logits = embeddings.pop("teacher_logits"), embeddings.pop("student_logits")
            kl.append(float(prediction_kl(*logits, att.bool(), 1.0)))
    result = similarity_agreement(
        torch.cat(embeddings["student"]), torch.cat(embeddings["teacher"])
    )
    return result | ({"mlm_kl": sum(kl) / len(kl)} if kl else {})


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
    entry = magnitudes(dict(teacher.model.named_parameters()))
    scores = structure_scores(teacher.model, entry, teacher.shape.head_dim)
    return masks_at_target(recipe, teacher, scores)


def masks_at_target(recipe: Recipe, teacher: Teacher, scores: dict[str, torch.Tensor]) -> Masks:
    """The target widths in one cut by `scores`, and evenly spaced layers (DistilBERT-style)."""
    full, target = teacher.shape, recipe.target.shape()
    widths = Schedule.one_shot(full, target).widths_at(0)
    masks = prune_to(Masks.full(full), scores, widths)
    kept = select_layers(torch.zeros(full.layers), target.layers, "uniform")
    return Masks(**{**masks.__dict__, "layers": kept, "fade": kept.float()})


def untrained_slice(recipe: Recipe, output: Path, teacher: Teacher | None = None) -> RunResult:
    """The cheapest student of the target shape, a baseline: the teacher's evenly spaced layers
    and the first k of every width, slimmed with no training at all. A finished run directory
    (model, summary with its shipped quality, the held-out discrepancy at step 0), so it is
    evaluated and compared like any trained run."""
    started = time.time()
    check_against_teacher(recipe, teacher.model.config.to_dict() if teacher else None)
    run_dir = new_run_dir(Path(output), recipe.name)
    (run_dir / RECIPE_FILE).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    teacher = teacher or load_teacher(recipe.teacher)
    model = teacher.model.cpu()
    corpus = Corpus(recipe.data, teacher.tokenizer, recipe.train.seed, 1, 1)
    masks = masks_at_target(recipe, teacher, truncation_scores(teacher.shape))
    plan = PrunePlan.from_masks(masks, teacher.shape)
    heldout = corpus.heldout
    maps = HiddenMaps(teacher.shape.layers + 1, teacher.shape.hidden)
    record = evaluate(0, teacher, model, maps, masks, heldout, teacher.encode(heldout))
    MetricsLog(run_dir).write(record)
    outcome = Outcome(model, masks, plan, plan, {}, [record], 0, started, "cpu")
    summary = ship(recipe, run_dir, teacher, corpus, outcome)
    return RunResult(run_dir, summary.to_dict())


def register_run(run_dir: Path, zoo: Path | None = None, trust_remote_code: bool = False) -> str:
    """Register a finished, verified run in the zoo (`compress zoo add`): what the zoo refuses
    (links, malformed files, code unless `trust_remote_code`) is checked first, then its recipe's
    gates (the quality gate evaluates the run if its evaluation is not recorded yet)."""
    run_dir = require_not_entry(Path(run_dir))
    zoo_store.check_registrable(run_dir, trust_remote_code)
    recipe = load_run_recipe(run_dir)
    evaluate_for_gates(recipe.gates, run_dir)
    check_gates(recipe.gates, run_dir)
    root = zoo_store.zoo_root(zoo, recipe.zoo.dir)
    return zoo_store.register(run_dir, root, trust_remote_code)
