"""`compress eval --mteb`: a run's (or a zoo entry's) student and its teacher on MTEB-protocol
tasks, scored by mteb's own evaluators, with the student's retention of the teacher's main score.

    target -> student + teacher as sentence-transformers models -> mteb.evaluate per task
           -> one record per task -> evaluations.json (run) / zoo entry (card, show, report)

The teacher's scores are cached per (teacher weights, task, task data revision, mteb version), so
evaluating many students of one teacher runs the teacher once per task.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compressor.cache import cache_root
from compressor.environment import pick_device
from compressor.errors import DataError, RunDirError
from compressor.evaluate import mteb_tasks
from compressor.recipe import load_run_recipe
from compressor.rundir import MODEL_DIR, evals_path, is_run_dir, read_json, write_json_atomic
from compressor.teacher import resolve_source
from compressor.zoo import store as zoo_store
from compressor.zoo.mteb_scores import MODE, category, category_summary, is_mteb, retention

SPLIT = "test"
SKIP_KEYS = ("main_score", "hf_subset", "languages", "mteb_version")


# ---------------------------------------------------------------------------- pure parts


def side(value: float, scores: dict[str, float], seconds: float) -> dict[str, Any]:
    """One encoder's result, in the shape every evaluation record has (mean, std, per_seed)."""
    return {"mean": value, "std": None, "per_seed": [value], "seconds": round(seconds, 1),
            "scores": scores}  # fmt: skip


def mteb_record(task_name: str, task_type: str, main_score: str, source: str, dataset: str,
                revision: str,
                student: dict, teacher: dict | None, mteb_version: str) -> dict[str, Any]:  # fmt: skip
    record = {
        "task": task_name,
        "mode": MODE,
        "metric": main_score,
        "task_type": task_type,
        "category": category(task_type),
        "source": source,
        "seeds": [],
        "settings": {
            "mteb_version": mteb_version,
            "split": SPLIT,
            "dataset": dataset,
            "revision": revision,
        },
        "splits": {"task": task_name, "split": SPLIT},
        "student": student,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if teacher is not None:
        record["teacher"] = teacher
        record["retention"] = retention(student["mean"], teacher["mean"])
    return record


def json_view(records: list[dict]) -> dict[str, Any]:
    """What `--json` prints: one entry per task (student and teacher are main-score values,
    scores the student's other scores), and the category averages."""
    tasks = [
        {
            "task": r["task"],
            "type": r["task_type"],
            "category": r["category"],
            "main_score": r["metric"],
            "student": r["student"]["mean"],
            "teacher": (r.get("teacher") or {}).get("mean"),
            "retention": r.get("retention"),
            "scores": r["student"]["scores"],
        }
        for r in records
    ]
    return {"tasks": tasks, "categories": category_summary(records)}


def format_record(r: dict) -> str:
    teacher = (r.get("teacher") or {}).get("mean")
    kept = r.get("retention")
    text = f"{r['task']} ({r['category']}, {r['metric']}): student {r['student']['mean']:.4f}"
    if teacher is not None:
        text += f"  teacher {teacher:.4f}"
    if kept is not None:
        text += f"  retention {kept:.1f}%"
    return text + f"  ({r['student']['seconds']} s)"


def format_summary(rows: list[dict]) -> str:
    lines = ["category                 tasks  student  teacher  retention"]
    for c in rows:
        t = "-" if c["teacher"] is None else f"{c['teacher']:.4f}"
        k = "-" if c["retention"] is None else f"{c['retention']:.1f}%"
        lines.append(f"{c['category']:<24} {c['tasks']:>5}  {c['student']:.4f}  {t:>7}  {k:>9}")
    return "\n".join(lines)


def score_dict(raw: dict[str, Any]) -> dict[str, float]:
    """mteb's scores of one split, the numbers only (main_score is kept under its own name)."""
    return {k: float(v) for k, v in raw.items()
            if k not in SKIP_KEYS and isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip


# ---------------------------------------------------------------------------- running mteb


def sentence_encoder(source: str | Path, device: str, local_only: bool = True):
    """A sentence-transformers model of a model directory (mean pooling when it has no modules)."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(source), device=device, local_files_only=local_only)
    except OSError as err:
        raise RunDirError(
            f"{source}: cannot load it as a sentence encoder ({str(err).splitlines()[0]})"
        ) from None


def encoder_key(model) -> str:
    """Content key of an encoder: its modules and a checksum of every weight."""
    h = hashlib.sha256(repr(model).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(f"{float(p.detach().double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def load(task, name: str, source: str) -> None:
    """Load a task's rows; a hub task that cannot reach its data is one clear error."""
    try:
        task.load_data()
    except DataError:
        raise
    except Exception as err:
        if source != "hub":
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise DataError(
            f"--mteb {name}: mteb could not load its data from the Hugging Face hub (offline?"
            f" HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set?): {type(err).__name__}: {first}"
        ) from None


def run_task(model, task) -> tuple[float, dict[str, float], float]:
    """(main score, every score, seconds) of `model` on a loaded task, by mteb's evaluator."""
    import mteb
    from mteb._set_seed import _set_seed

    # mteb's samplers (clustering's subsets, classification's undersampling) draw from the task's
    # own generators: reseed them so that every encoder is scored on the same samples
    task.rng_state, task.np_rng = _set_seed(task.seed)
    start = time.perf_counter()
    # mteb's own calls of deprecated APIs warn: nothing a user can act on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        result = mteb.evaluate(model, task, cache=None, show_progress_bar=False,
                               encode_kwargs={"batch_size": 32})  # fmt: skip
    task_result = result.task_results[0]
    raw = task_result.scores[SPLIT][0]
    return float(raw["main_score"]), score_dict(raw), time.perf_counter() - start


def cached_teacher(teacher, teacher_id: str, task, revision: str) -> dict[str, Any]:
    import mteb

    key = json.dumps([teacher_id, task.metadata.name, task.metadata.type, revision,
                      mteb.__version__, "reseeded"])  # fmt: skip
    path = cache_root() / "mteb" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())
    main, scores, seconds = run_task(teacher, task)
    result = side(main, scores, seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result


def evaluate_mteb_dir(root: Path, names: list[str], with_teacher: bool = True,
                      device: str = "auto",
                      on_record: Callable[[dict], None] | None = None) -> list[dict]:  # fmt: skip
    """Evaluate the student in `root/model` (a run dir or zoo entry), and its teacher, on each
    task; `on_record` sees each record as it is made."""
    import mteb

    root = Path(root)
    if not (root / MODEL_DIR).is_dir():
        raise RunDirError(f"{root}: no slim model ({MODEL_DIR}/); has the run finished?")
    resolved = [(n, *mteb_tasks.resolve_task(n)) for n in mteb_tasks.expand(names)]
    dev = pick_device(device)
    student = sentence_encoder(root / MODEL_DIR, dev)
    teacher = teacher_id = None
    if with_teacher:
        spec = load_run_recipe(root).teacher
        teacher = sentence_encoder(resolve_source(spec), dev, local_only=spec.source != "hub")
        teacher_id = encoder_key(teacher)
    records = []
    for name, task, source in resolved:
        load(task, name, source)
        dataset = str(task.metadata.dataset.get("path", name))
        revision = str(task.metadata.dataset.get("revision", ""))
        main, scores, seconds = run_task(student, task)
        teacher_side = cached_teacher(teacher, teacher_id, task, revision) if teacher else None
        record = mteb_record(task.metadata.name, task.metadata.type, task.metadata.main_score,
                             source, dataset, revision, side(main, scores, seconds),
                             teacher_side,
                             mteb.__version__)  # fmt: skip
        records.append(record)
        if on_record is not None:
            on_record(record)
    return records


def evaluate_mteb_target(target: str, names: list[str], with_teacher: bool = True,
                         zoo_dir: Path | None = None,
                         on_record: Callable[[dict], None] | None = None) -> tuple[list[dict], str]:  # fmt: skip
    """Evaluate a run directory or a zoo entry and record every result there (as `compress eval
    --task` does). Returns the records and where they went."""
    from compressor.evaluate.evaluation import append_to_run

    run_dir, entry_id, root = Path(target), None, zoo_store.zoo_root(zoo_dir)
    if not is_run_dir(run_dir):
        entry_id = zoo_store.resolve(root, target)
        zoo_store.check_recordable(root, entry_id)
        run_dir = zoo_store.entry_dir(root, entry_id)

    def record(r: dict) -> None:
        if entry_id:
            zoo_store.record_evaluation(root, entry_id, r)
        else:
            append_to_run(run_dir, r)
        if on_record is not None:
            on_record(r)

    records = evaluate_mteb_dir(run_dir, names, with_teacher, on_record=record)
    return records, f"zoo entry {entry_id}" if entry_id else str(evals_path(run_dir))


def recorded_or_scored(run_dir: Path, names: list[str]) -> list[dict]:
    """The run's MTEB record of each task (with its teacher, the same task revision and mteb
    version), scoring and recording only the tasks it lacks: what `compress baselines` reads,
    so re-running a comparison re-scores nothing. One record per task, in order."""
    import mteb

    from compressor.evaluate.evaluation import append_to_run

    run_dir = Path(run_dir)
    wanted = {}
    for name in mteb_tasks.expand(names):
        task, _ = mteb_tasks.resolve_task(name)
        wanted[name] = (task.metadata.name, str(task.metadata.dataset.get("revision", "")))
    have: dict[str, dict] = {}
    for r in read_json(evals_path(run_dir), {"evaluations": []})["evaluations"]:
        if is_mteb(r) and "teacher" in r and r["settings"]["mteb_version"] == mteb.__version__:
            have[(r["task"], r["settings"]["revision"])] = r  # the latest one counts
    missing = [n for n, key in wanted.items() if key not in have]
    if missing:
        for r in evaluate_mteb_dir(run_dir, missing, on_record=lambda r: append_to_run(run_dir, r)):
            have[(r["task"], r["settings"]["revision"])] = r
    return [have[key] for key in wanted.values()]
