"""Recipes: one YAML file loaded into frozen, typed objects and validated before any model loads.

Every default lives here, once. Validation reports every problem at once, each with its dotted key,
what was expected and, for a misspelt key, a "did you mean".
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compressor.errors import RecipeError
from compressor.rundir import RECIPE_FILE, require_run_dir
from compressor.shapes import Shape, config_has_mlm_head

STRUCTURES = ("layers", "heads", "head_dims", "ffn", "hidden")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TeacherSpec(_Frozen):
    """Where the teacher comes from: a hub id, a local directory, or an installed Python package."""

    source: Literal["hub", "local", "package"]
    id: str = Field(min_length=1, description="hub id, directory path, or package name")
    revision: str | None = None
    random_init: bool = Field(
        False,
        description="build the teacher's architecture with random weights (shape/speed tests only)",
    )


class DataSpec(_Frozen):
    """Open-domain text for distillation."""

    source: Literal["hub", "files", "wiki_summaries"]
    name: str | None = None  # hub dataset name
    config: str | None = None  # hub dataset config
    split: str = "train"
    streaming: bool = False
    files: tuple[str, ...] = ()  # local .txt / .jsonl / .json / .parquet
    text_field: str = "text"
    max_length: int = Field(128, ge=8, le=4096)
    heldout: int = Field(32, ge=3, description="sequences held out for the discrepancy curve")
    quality_texts: int = Field(
        256, ge=0, description="more held-out texts for the final, map-free quality (0: none)"
    )
    shuffle_buffer: int = Field(10_000, ge=1, description="streaming shuffle buffer")


class TargetShape(_Frozen):
    """The student's final shape. Uniform widths, so it is a stock BertConfig."""

    layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    heads: int = Field(ge=1)
    ffn: int = Field(ge=1)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shape(self) -> Shape:
        return Shape(self.layers, self.hidden, self.heads, self.head_dim, self.ffn)


class PruningSpec(_Frozen):
    structures: tuple[Literal["layers", "heads", "head_dims", "ffn", "hidden"], ...] = STRUCTURES
    # `truncate` keeps the first k of every structure: DistilBERT-style width truncation (baseline)
    importance: Literal["sensitivity", "magnitude", "truncate"] = "sensitivity"
    uncertainty: bool = True
    beta1: float = Field(0.85, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    schedule: Literal["cubic", "linear", "one_shot"] = "cubic"
    start_step: int = Field(0, ge=0)
    end_step: int = Field(ge=0)
    interval: int = Field(10, ge=1)
    # how the layers to remove are chosen (our extension: the paper keeps depth). `removal`:
    # greedy, from the measured discrepancy of the final output with each layer faded out;
    # `sensitivity`: |fade * dL/dfade|; `uniform`: evenly spaced (DistilBERT-style)
    layer_selection: Literal["removal", "sensitivity", "uniform"] = "removal"
    probe_batches: int = Field(
        4, ge=0, description="batches that seed sensitivity (with dropout) or rank layer removal"
    )
    probe_dropout: float = Field(0.1, gt=0.0, lt=1.0)
    min_history: int = Field(
        5, ge=1, description="EMA updates before a pruning decision may come from the EMA"
    )
    min_signal_margin: float = Field(
        100.0,
        gt=1.0,
        description="required ratio of the median importance to the noise floor, per kind",
    )


class StudentSpec(_Frozen):
    """Where the student's weights start: an exact copy of the teacher (HomoDistil), or random
    weights in the teacher's architecture (the random-initialisation baseline)."""

    init: Literal["teacher", "random"] = "teacher"


class DistillSpec(_Frozen):
    """Loss weights. MLM terms need a teacher with an MLM head; `prediction` is the KL of MLM
    predictions for such teachers and the final-representation cosine term for head-less ones."""

    mlm: float = Field(0.0, ge=0.0)
    prediction: float = Field(1.0, ge=0.0)
    hidden: float = Field(1.0, ge=0.0)
    attention: float = Field(1.0, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    student_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout in the student's training forward (not in eval)"
    )


class TrainSpec(_Frozen):
    steps: int = Field(ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)  # decay would pull the student off the teacher
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-6, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(50, ge=1)


class ExportSpec(_Frozen):
    """ONNX export and its verification gate (fp32 always checked; int8 optional)."""

    onnx: bool = True
    optimize: bool = True  # onnxruntime BERT fusions (fused attention etc.), then verified
    int8: bool = False
    atol: float = Field(1e-4, ge=0.0)
    rtol: float = Field(1e-4, ge=0.0)
    min_agreement: float = Field(0.9999, ge=0.0, le=1.0, description="cosine / top-1, fp32")
    int8_atol: float = Field(1.0, ge=0.0)
    int8_rtol: float = Field(0.0, ge=0.0)
    int8_min_agreement: float = Field(0.98, ge=0.0, le=1.0)
    batch_sizes: tuple[int, ...] = Field((1, 4), min_length=1)
    seq_lengths: tuple[int, ...] = Field((16, 128), min_length=1)


class BenchSpec(_Frozen):
    """Latency of student vs teacher, each timed in its own process."""

    enabled: bool = True
    batch_sizes: tuple[int, ...] = Field((1,), min_length=1)
    seq_lengths: tuple[int, ...] = Field((128,), min_length=1)
    threads: int = Field(2, ge=1)
    warmup: int = Field(5, ge=0)
    iters: int = Field(30, ge=1)
    rounds: int = Field(2, ge=1)
    torch_baseline: bool = True


class OutputSpec(_Frozen):
    dir: str = "runs"


class GatesSpec(_Frozen):
    """Limits a finished run must meet; a miss exits 3 and nothing is registered (None: unchecked)."""

    max_params: int | None = Field(None, ge=1, description="student parameter count")
    min_speedup: float | None = Field(
        None, gt=0.0, description="onnxruntime fp32 p50 speedup at the first benchmarked shape"
    )
    max_discrepancy: float | None = Field(None, ge=0.0, description="final held-out discrepancy")


with warnings.catch_warnings():  # `register` also names ABCMeta.register; fields are unaffected
    warnings.filterwarnings("ignore", message='Field name "register"')

    class ZooSpec(_Frozen):
        register: bool = True
        dir: str | None = None  # default: $COMPRESS_ZOO, else ./zoo


class Recipe(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    teacher: TeacherSpec
    data: DataSpec
    target: TargetShape
    pruning: PruningSpec
    student: StudentSpec = StudentSpec()
    distill: DistillSpec = DistillSpec()
    train: TrainSpec
    export: ExportSpec = ExportSpec()
    bench: BenchSpec = BenchSpec()
    output: OutputSpec = OutputSpec()
    gates: GatesSpec = GatesSpec()
    zoo: ZooSpec = ZooSpec()


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file. Raises RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), ["file not found"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(str(path), [f"not valid YAML: {err}"]) from None
    return parse_recipe(raw, source=str(path))


def load_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run (or a zoo entry) was started with."""
    path = require_run_dir(run_dir) / RECIPE_FILE
    return parse_recipe(yaml.safe_load(path.read_text()), str(path))


def with_overrides(base: Recipe, overrides: list[str]) -> Recipe:
    """The recipe with `section.key=value` overrides (values parsed as YAML), re-validated."""
    if not overrides:
        return base
    raw = recipe_to_dict(base)
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        path = key.strip().split(".")
        if not sep or len(path) != 2 or not isinstance(raw.get(path[0]), dict):
            problems.append(f"--set {item!r}: expected section.key=value, e.g. pruning.end_step=50")
            continue
        try:
            raw[path[0]][path[1]] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problems.append(f"--set {item!r}: the value is not valid YAML ({err})")
    if problems:
        raise RecipeError(base.name, problems)
    return parse_recipe(raw, f"{base.name} with --set {' '.join(overrides)}")


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(source, ["the recipe must be a mapping of sections (teacher, data, ...)"])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(e) for e in err.errors()]
        raise RecipeError(source, problems + _section_problems(raw)) from None
    problems = cross_field_problems(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def cross_field_problems(r: Recipe) -> list[str]:
    """Checks that span fields. Teacher-dependent checks live in `teacher_problems`."""
    p: list[str] = []
    if r.target.hidden % r.target.heads:
        p.append(
            f"target.hidden: {r.target.hidden} is not divisible by target.heads ({r.target.heads});"
            " a stock BertConfig needs hidden == heads * head_dim"
        )
    if r.pruning.end_step >= r.train.steps:
        p.append(
            f"pruning.end_step: {r.pruning.end_step} must be < train.steps ({r.train.steps}):"
            " the last pruning event happens at the end of step end_step"
        )
    if r.pruning.start_step > r.pruning.end_step:
        p.append(
            f"pruning.start_step: {r.pruning.start_step} is after pruning.end_step"
            f" ({r.pruning.end_step})"
        )
    if r.train.warmup_steps > r.train.steps:
        p.append(f"train.warmup_steps: {r.train.warmup_steps} exceeds train.steps")
    if r.data.source == "hub" and not r.data.name:
        p.append("data.name: required when data.source is 'hub' (a dataset id on the hub)")
    if r.data.source == "files" and not r.data.files:
        p.append("data.files: required when data.source is 'files' (.txt, .jsonl, .json, .parquet)")
    if r.data.streaming and r.data.source != "hub":
        p.append("data.streaming: only a hub dataset streams; local text is read into memory")
    if len(set(r.pruning.structures)) != len(r.pruning.structures):
        p.append("pruning.structures: lists a structure twice")
    if r.bench.enabled and not r.export.onnx:
        p.append("bench.enabled: the benchmark times the ONNX export; set export.onnx: true")
    if max(r.export.seq_lengths + r.bench.seq_lengths) > 4096:
        p.append("export.seq_lengths / bench.seq_lengths: longer than any BERT position table")
    if r.pruning.importance == "truncate" and r.pruning.layer_selection != "uniform":
        p.append(
            "pruning.layer_selection: width truncation ranks nothing, so layers must be chosen"
            " 'uniform' (evenly spaced, DistilBERT-style)"
        )
    if r.distill.mlm + r.distill.prediction + r.distill.hidden + r.distill.attention == 0:
        p.append("distill: every loss weight is 0; nothing would be learned")
    return p


def _section_problems(raw: dict[str, Any]) -> list[str]:
    """Cross-field checks of the sections that did validate, so one pass reports them too."""
    try:
        target = TargetShape.model_validate(raw.get("target"))
    except ValidationError:
        return []
    if target.hidden % target.heads:
        return [f"target.hidden: {target.hidden} is not divisible by target.heads ({target.heads})"]
    return []


def teacher_problems(r: Recipe, teacher: dict[str, Any]) -> list[str]:
    """Checks the target against the teacher's config (a dict of BertConfig fields)."""
    p: list[str] = []
    t_layers, t_hidden = teacher["num_hidden_layers"], teacher["hidden_size"]
    t_heads, t_ffn = teacher["num_attention_heads"], teacher["intermediate_size"]
    t_head_dim = t_hidden // t_heads
    want = {
        "layers": (r.target.layers, t_layers),
        "hidden": (r.target.hidden, t_hidden),
        "heads": (r.target.heads, t_heads),
        "ffn": (r.target.ffn, t_ffn),
    }
    for key, (target, full) in want.items():
        if target > full:
            p.append(f"target.{key}: {target} is larger than the teacher's {full}")
    if r.target.head_dim > t_head_dim:
        p.append(
            f"target: head size {r.target.head_dim} (hidden/heads) is larger than the teacher's"
            f" {t_head_dim}"
        )
    needs = {
        "layers": r.target.layers < t_layers,
        "hidden": r.target.hidden < t_hidden,
        "heads": r.target.heads < t_heads,
        "ffn": r.target.ffn < t_ffn,
        "head_dims": r.target.head_dim < t_head_dim,
    }
    for kind, needed in needs.items():
        if needed and kind not in r.pruning.structures:
            p.append(
                f"pruning.structures: the target shrinks {kind} but '{kind}' is not listed"
                f" (listed: {', '.join(r.pruning.structures)})"
            )
    if r.distill.mlm > 0 and not config_has_mlm_head(teacher):
        p.append(
            f"distill.mlm: {r.distill.mlm} needs a teacher with a masked-LM head;"
            f" this teacher is {teacher.get('architectures')}. Set distill.mlm: 0"
        )
    return p


# ---------------------------------------------------------------------------- error formatting


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = err["loc"][:-1], str(err["loc"][-1])
        known = _known_keys(parent)
        hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        msg = f"{loc}: unknown key"
        if hint:
            prefix = ".".join(str(x) for x in parent)
            msg += f"; did you mean '{prefix + '.' if prefix else ''}{hint[0]}'?"
        elif known:
            msg += f" (known keys: {', '.join(known)})"
        return msg
    if kind == "missing":
        return f"{loc}: required key is missing"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    return f"{loc}: {err['msg']} (got {shown})"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def recipe_to_dict(r: Recipe) -> dict[str, Any]:
    return r.model_dump(mode="json")
