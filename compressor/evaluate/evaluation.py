"""`compress eval`: downstream quality of a run's (or a zoo entry's) student, with its teacher
side by side on the same splits, seeds and settings.

    target -> student + teacher -> task splits -> evaluate both -> evaluations.json (run) / zoo record

The teacher's numbers are cached per (teacher content, task, settings, seeds), so evaluating many
students of one teacher fine-tunes the teacher once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from compressor.arch import architecture_for
from compressor.cache import cache_root
from compressor.environment import pick_device
from compressor.errors import RunDirError
from compressor.evaluate.downstream import evaluate_encoder, task_metric
from compressor.evaluate.settings import EvalSettings
from compressor.evaluate.tasks import RetrievalTask, load_task
from compressor.recipe import load_run_recipe
from compressor.rundir import (
    MODEL_DIR,
    evals_path,
    is_run_dir,
    lock_run_dir,
    read_json,
    require_not_entry,
    write_json_atomic,
)
from compressor.teacher import Teacher, load_teacher, teacher_key
from compressor.zoo import store as zoo_store


def evaluate_target(
    target: str,
    tasks: list[str],
    settings: EvalSettings,
    seeds: list[int],
    with_teacher: bool = True,
    zoo_dir: Path | None = None,
    columns: dict[str, str | None] | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> tuple[list[dict], str]:
    """Evaluate a run directory or a zoo entry on each task and record every result (the run's
    evaluations.json, or the zoo entry in one transaction). Returns the records and where they
    went."""
    run_dir, entry_id, root = Path(target), None, zoo_store.zoo_root(zoo_dir)
    if not is_run_dir(run_dir):
        entry_id = zoo_store.resolve(root, target)
        zoo_store.check_recordable(root, entry_id)  # before the (long) evaluation, not after
        run_dir = zoo_store.entry_dir(root, entry_id)
        return _evaluate_all(run_dir, entry_id, root, tasks, settings, seeds, with_teacher,
                             columns, on_record)  # fmt: skip
    with lock_run_dir(require_not_entry(run_dir)):
        return _evaluate_all(run_dir, None, root, tasks, settings, seeds, with_teacher, columns,
                             on_record)  # fmt: skip


def _evaluate_all(run_dir, entry_id, root, tasks, settings, seeds, with_teacher, columns,
                  on_record) -> tuple[list[dict], str]:  # fmt: skip
    records = []
    for task in tasks:
        record = evaluate_dir(run_dir, task, settings, seeds, with_teacher=with_teacher,
                              **(columns or {}))  # fmt: skip
        if entry_id:
            zoo_store.record_evaluation(root, entry_id, record)
        else:
            append_to_run(run_dir, record)
        records.append(record)
        if on_record is not None:
            on_record(record)
    return records, f"zoo entry {entry_id}" if entry_id else str(evals_path(run_dir))


def evaluate_dir(
    model_dir_root: Path,
    task_name: str,
    settings: EvalSettings,
    seeds: list[int],
    teacher: Teacher | None = None,
    with_teacher: bool = True,
    device: str = "auto",
    **task_columns: str | None,
) -> dict:
    """Evaluate the student in `model_dir_root/model` (a run dir or zoo entry) and its teacher."""
    from transformers import AutoModel, AutoTokenizer

    root = Path(model_dir_root)
    if not (root / MODEL_DIR).is_dir():
        raise RunDirError(f"{root}: no slim model ({MODEL_DIR}/); has the run finished?")
    dev = pick_device(device)
    task = load_task(task_name, split_seed=settings.split_seed, max_train=settings.max_train,
                     max_eval=settings.max_eval, **task_columns)  # fmt: skip
    student = AutoModel.from_pretrained(root / MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(root / MODEL_DIR)
    record = {
        "task": task.name,
        "mode": settings.mode,
        "metric": task_metric(task),
        "seeds": [] if deterministic(task, settings) else seeds,
        "settings": settings.to_dict(),
        "splits": task.describe(),
        "student": evaluate_encoder(student, tokenizer, task, settings, seeds, dev, "student"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if with_teacher:
        teacher = teacher or load_teacher(load_run_recipe(root).teacher)
        record["teacher"] = cached_teacher_result(teacher, task, settings, seeds, dev)
    return record


def deterministic(task, settings: EvalSettings) -> bool:
    """The probe and retrieval give one number per encoder; only fine-tuning depends on a seed."""
    return settings.mode != "finetune" or task_metric(task) != "accuracy"


def cached_teacher_result(teacher: Teacher, task, settings: EvalSettings, seeds, device) -> dict:
    seeds = [] if deterministic(task, settings) else seeds
    used = settings.used(isinstance(task, RetrievalTask))
    key = json.dumps([teacher_key(teacher), task.describe(), used, seeds])
    path = cache_root() / "evals" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())
    encoder = architecture_for(teacher.model).base_model(teacher.model)
    result = evaluate_encoder(encoder, teacher.tokenizer, task, settings, seeds, device, "teacher")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result


def evaluation_of(run_dir: Path, task: str, settings: EvalSettings) -> dict | None:
    """A recorded evaluation of `task` (with its teacher's numbers) made with every setting its
    result depends on."""
    for r in read_json(evals_path(run_dir), {"evaluations": []})["evaluations"]:
        if r.get("mode") == "mteb":  # `compress eval --mteb`: not a fine-tuning/probe result
            continue
        retrieval = "documents" in r["splits"]
        used = EvalSettings(**r["settings"]).used(retrieval)
        if r["task"] == task and "teacher" in r and used == settings.used(retrieval):
            return r
    return None


def recorded_or_evaluated(
    run_dir: Path,
    task: str,
    settings: EvalSettings,
    seeds: list[int],
    teacher: Teacher | None = None,
) -> dict:
    """The run's recorded evaluation of `task` under `settings`, or a new one, recorded."""
    record = evaluation_of(run_dir, task, settings)
    if record is None:
        record = evaluate_dir(run_dir, task, settings, seeds, teacher=teacher)
        append_to_run(run_dir, record)
    return record


def append_to_run(run_dir: Path, record: dict) -> Path:
    """Append one evaluation to the run's evaluations.json (atomically replaced)."""
    path = evals_path(Path(run_dir))
    data = read_json(path, {"evaluations": []})
    data["evaluations"].append(record)
    write_json_atomic(path, data)
    return path


def format_record(r: dict) -> str:
    """Student and teacher side by side, one line each."""

    def line(who: str, x: dict) -> str:
        spread = f" ± {x['std']:.4f}" if len(x["per_seed"]) > 1 else ""
        seeds = ", ".join(f"{v:.4f}" for v in x["per_seed"])
        return f"  {who:<8} {x['mean']:.4f}{spread}   per seed: [{seeds}]   ({x['seconds']} s)"

    sizes = ", ".join(f"{k} {v}" for k, v in r["splits"].items() if k not in ("task", "labels"))
    head = f"{r['task']} ({r['mode']}, test {r['metric']}; {sizes})"
    lines = [head, line("student", r["student"])]
    if "teacher" in r:
        lines.append(line("teacher", r["teacher"]))
        lines.append(f"  student / teacher = {r['student']['mean'] / r['teacher']['mean']:.3f}")
    return "\n".join(lines)
