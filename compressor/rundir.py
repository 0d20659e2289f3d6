"""The run-directory contract: every artifact's name, the typed summary, and JSON I/O.

This module is the only place that spells a file name of a run directory or a zoo entry. It is
light on purpose (no torch, no pydantic): `compress zoo list` and `--help` import it.

    runs/<recipe name>/<YYYYmmdd-HHMMSS>/
      recipe.yaml  environment.json  heldout.json     written at start
      metrics.jsonl  checkpoint.pt  checkpoint.prev.pt during training
      plan.json  model/  summary.json  discrepancy.png after training
      onnx/  verify.json  benchmark.json               deployment stages
      model/onnx/model.onnx                            (sentence encoders) the pooled graph
      evaluations.json                                 downstream evaluations (compress eval)
      st_distill.json                                  (the st_distill baseline) how it trained

A zoo entry holds the same files plus manifest.json and README.md (the model card).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from compressor.errors import RunDirError

# ---------------------------------------------------------------------------- names

RECIPE_FILE = "recipe.yaml"
ENV_FILE = "environment.json"
HELDOUT_FILE = "heldout.json"
METRICS_FILE = "metrics.jsonl"  # the training curve: losses, widths, discrepancy per step
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_PREV_FILE = "checkpoint.prev.pt"  # the one before, kept in case the last is damaged
CHECKPOINT_TMP_SUFFIX = ".tmp"  # a checkpoint being written (removed if the write fails)
PLAN_FILE = "plan.json"
MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "discrepancy.png"
ONNX_DIR = "onnx"
VERIFY_FILE = "verify.json"
BENCH_FILE = "benchmark.json"
EVALS_FILE = "evaluations.json"  # downstream evaluations (compress eval)
ST_DISTILL_FILE = "st_distill.json"  # how the `st_distill` baseline was trained (its loss, PCA)
LEGACY_EVALS_FILE = "metrics.json"  # its name before 0.2; read, and kept where it already exists

# inside onnx/
ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
SAMPLES_FILE = "samples.safetensors"
EXPORT_REPORT = "export.json"
# inside model/: the sentence-transformers graph of a sentence encoder (deploy/sentence.py), where
# SentenceTransformer(model_dir, backend="onnx") looks for it
SENTENCE_ONNX_FILE = f"{ONNX_DIR}/{ONNX_FILE}"
ST_MODULES_FILE = "modules.json"  # inside model/: present when the teacher is a sentence encoder
SENTENCE_ONNX = f"{MODEL_DIR}/{SENTENCE_ONNX_FILE}"

# zoo entries and the zoo
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
ONNX_MODEL = f"{ONNX_DIR}/{ONNX_FILE}"
ZOO_INDEX_FILE = "index.sqlite"
ZOO_REPORT_DIR = "report"  # `compress zoo report`: <zoo>/report/index.html unless --out
ZOO_REPORT_FILE = "index.html"  # one self-contained page (images inline as data: URIs)

# the output directory of `compress baselines` (runs/ holds one run directory per variant and seed)
BASELINES_RESULTS_JSON = "results.json"
BASELINES_RESULTS_MD = "results.md"
BASELINES_CURVES_PNG = PLOT_FILE
BASELINES_SCORES_PNG = "scores_vs_params.png"
BASELINES_CATEGORIES_PNG = "mteb_categories.png"

# what a new run directory holds before training starts (a run that fails there is removed)
START_FILES = (RECIPE_FILE, ENV_FILE, HELDOUT_FILE)

# what a zoo entry copies from a run directory (the first group must exist; the second may)
RUN_FILES = (
    MODEL_DIR,
    ONNX_DIR,
    RECIPE_FILE,
    PLAN_FILE,
    SUMMARY_FILE,
    VERIFY_FILE,
    ENV_FILE,
    HELDOUT_FILE,
)
OPTIONAL_RUN_FILES = (BENCH_FILE, METRICS_FILE, PLOT_FILE, EVALS_FILE, LEGACY_EVALS_FILE)


def evals_path(d: Path) -> Path:
    """Where a run or entry keeps its evaluations (the legacy name where that file exists)."""
    legacy = Path(d) / LEGACY_EVALS_FILE
    return legacy if legacy.exists() and not (Path(d) / EVALS_FILE).exists() else d / EVALS_FILE


# ---------------------------------------------------------------------------- JSON I/O


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(Path(path).read_text()) if Path(path).exists() else default


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the summary


@dataclass
class RunSummary:
    """summary.json: what a finished run produced. Written by the pipeline, read by the gates,
    the zoo, the model card and the comparisons."""

    recipe: str
    teacher: str
    teacher_shape: dict[str, int]
    student_shape: dict[str, int]
    teacher_params: int
    student_params: int
    checks: dict[str, float]
    discrepancy: dict[str, Any]
    steps: int
    seconds: float
    device: str
    quality: dict[str, Any] = field(default_factory=dict)  # measured on the shipped model
    export: dict[str, Any] | None = None
    benchmark: dict[str, Any] | None = None
    zoo_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSummary:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_summary(run_dir: Path) -> RunSummary:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.exists():
        raise RunDirError(f"{run_dir}: training has not finished (no {SUMMARY_FILE})")
    return RunSummary.from_dict(json.loads(path.read_text()))


def write_summary(run_dir: Path, summary: RunSummary) -> None:
    write_json_atomic(Path(run_dir) / SUMMARY_FILE, summary.to_dict())


# ---------------------------------------------------------------------------- run directories


def new_run_dir(root: Path, name: str) -> Path:
    """runs/<name>/<timestamp>[-n], created."""
    base = Path(root) / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = base / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = base / f"{stamp}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def latest_run(root: Path) -> Path:
    runs = sorted(Path(root).glob(f"*/*/{RECIPE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RunDirError(f"no runs under {root}")
    return runs[-1].parent


def require_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE_FILE).exists():
        raise RunDirError(f"{run_dir}: not a run directory (no {RECIPE_FILE})")
    return run_dir


def is_run_dir(path: Path) -> bool:
    return (Path(path) / RECIPE_FILE).exists()


# ---------------------------------------------------------------------------- zoo entries, locks


def entry_holding(path: Path) -> Path | None:
    """The zoo entry folder that `path` is (or lies inside), else None. An entry holds a manifest
    beside its recipe; a run directory never has a manifest."""
    path = Path(path).resolve()
    for d in (path, *path.parents):
        if (d / MANIFEST_FILE).is_file() and (d / RECIPE_FILE).is_file():
            return d
    return None


def require_not_entry(path: Path, what: str = "a run directory") -> Path:
    """`path`, unless it is (or lies inside) a zoo entry: entries never change, so a command that
    writes into a run directory refuses one, pointing to the entry's id."""
    entry = entry_holding(path)
    if entry is None:
        return Path(path)
    try:
        entry_id = json.loads((entry / MANIFEST_FILE).read_text()).get("id")
    except (OSError, ValueError, AttributeError):
        entry_id = None
    shown = repr(entry_id) if isinstance(entry_id, str) else "its id"
    raise RunDirError(
        f"{path}: this is a zoo entry ({shown}), not {what}; entries never change: give"
        f" its id instead (e.g. `compress eval {entry_id if isinstance(entry_id, str) else 'ID'}"
        " --task ...`, `compress zoo export ID DEST`)"
    )


@contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """One process per run directory: an exclusive flock on the directory itself, released when
    the process ends however it ends (a crash cannot leave it stuck; nothing is written)."""
    run_dir = Path(run_dir)
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise RunDirError(f"{run_dir}: cannot open the run directory ({err.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"{run_dir}: in use by another process (a run, export or evaluation of it is"
                " going on); wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)
