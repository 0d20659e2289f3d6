"""Recipes: one YAML file loaded into frozen, typed objects and validated before any model loads.

Every default lives here, once. Validation reports every problem at once, each with its dotted key,
what was expected and, for a misspelt key, a "did you mean".
"""

from __future__ import annotations

import difflib
import reprlib
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from compressor.arch import architecture_for
from compressor.errors import RecipeError, RunDirError
from compressor.rundir import RECIPE_FILE, require_run_dir
from compressor.shapes import Shape, config_has_mlm_head

STRUCTURES = ("layers", "heads", "head_dims", "ffn", "hidden")
# the evaluation tasks shipped in pip packages, which a quality gate may name (evaluate/tasks.py)
OFFLINE_TASKS = ("wiki_topics", "rotten_tomatoes", "movie_retrieval")
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; refuse anything past 1 MiB
MAX_YAML_DEPTH = 32  # sections nest 2-3 deep
MAX_YAML_NODES = 10_000  # values after aliases are expanded (an alias bomb expands to millions)
MAX_PROBLEMS = 25  # problems listed in one error; the rest are counted
SHOWN_CHARS = 80  # a value quoted in an error is cut to this many characters
INT64 = 2**63
MAX_SEED = 2**32  # seeds are scaled (seed * 1_000_003 + ...) into torch's 64-bit generator seed
MAX_STEPS = 10_000_000  # train.steps: 10M optimizer steps
MAX_BATCH = 65_536  # train.batch_size and train.grad_accum
MAX_NAME_BYTES = 255  # one path component on every common file system
MAX_PATH_BYTES = 4096

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Size = Annotated[int, Field(ge=1, le=65_536)]


def shown(value: Any) -> str:
    """A value as quoted in an error: its repr, bounded in depth and cut to SHOWN_CHARS."""
    text = _repr.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def cut(text: str) -> str:
    """A text quoted in an error, cut to SHOWN_CHARS (non-printable characters escaped)."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, SHOWN_CHARS, SHOWN_CHARS


def text_problem(value: str) -> str | None:
    """Why a string cannot be used as text or a path component (NUL, lone surrogates), or None."""
    if "\0" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (a lone surrogate)"
    return None


def path_problem(value: str) -> str | None:
    """Why a string cannot name a file or directory, or None."""
    bad = text_problem(value)
    if bad:
        return bad
    if len(value.encode()) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    long = [part for part in value.split("/") if len(part.encode()) > MAX_NAME_BYTES]
    if long:
        return f"has a component longer than {MAX_NAME_BYTES} bytes ({shown(long[0])})"
    return None


def _check_value(value: Any) -> Any:
    """Every recipe value: integers fit in 64 bits, strings are NUL-free, valid Unicode."""
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, int) and not isinstance(item, bool) and not -INT64 <= item < INT64:
            raise ValueError("the integer does not fit in 64 bits")
        if isinstance(item, str) and (bad := text_problem(item)):
            raise ValueError(f"the text {bad}")
    return value


def _check_path(value: Any) -> Any:
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, str) and (bad := path_problem(item)):
            raise ValueError(f"the path {bad}")
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _fits(cls, value: Any) -> Any:
        return _check_value(value)


class TeacherSpec(_Frozen):
    """Where the teacher comes from: a hub id, a local directory, or an installed Python package."""

    source: Literal["hub", "local", "package"]
    id: str = Field(min_length=1, description="hub id, directory path, or package name")
    revision: str | None = None
    random_init: bool = Field(
        False,
        description="build the teacher's architecture with random weights (shape/speed tests only)",
    )

    @model_validator(mode="after")
    def _id_fits_source(self) -> TeacherSpec:
        if self.source == "package" and not all(p.isidentifier() for p in self.id.split(".")):
            raise ValueError(
                f"teacher.id: {shown(self.id)} is not a package name (dotted Python identifiers)"
            )
        if self.source == "local" and (bad := path_problem(self.id)):
            raise ValueError(f"teacher.id: the path {bad}")
        return self


TextSource = Literal["hub", "files", "wiki_summaries", "convention_speeches"]
PACKAGED_SOURCES = ("wiki_summaries", "convention_speeches")  # read into memory (data.py)


class SourceSpec(_Frozen):
    """One text source of a mixture (data.sources): where its text comes from, and its weight,
    the share of training sequences drawn from it (weights need not sum to 1)."""

    source: TextSource
    weight: float = Field(1.0, gt=0.0)
    name: str | None = None  # hub dataset name
    config: str | None = None  # hub dataset config
    split: str = "train"
    files: tuple[str, ...] = ()  # local .txt / .jsonl / .json / .parquet files, or folders of them
    text_field: str = "text"

    @field_validator("files")
    @classmethod
    def _paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_path(value)


class DataSpec(_Frozen):
    """Open-domain text for distillation: one source (`source` and its keys), or a weighted
    mixture of several (`sources`), mixed reproducibly (mixture.py)."""

    source: TextSource | None = None
    name: str | None = None  # hub dataset name
    config: str | None = None  # hub dataset config
    split: str = "train"
    sources: tuple[SourceSpec, ...] = ()
    # read through `datasets` as a stream (hub or files): for corpora larger than memory;
    # loops over epochs and resumes from a saved position (stream.py)
    streaming: bool = False
    files: tuple[str, ...] = ()  # local .txt / .jsonl / .json / .parquet files, or folders
    text_field: str = "text"
    max_length: int = Field(128, ge=8, le=4096)
    # pack documents into full max_length sequences ([CLS] doc [SEP] doc ... [SEP], a long
    # document continued in the next sequence); false: one text per sequence, truncated
    pack: bool = True
    heldout: int = Field(32, ge=3, description="sequences held out for the discrepancy curve")
    quality_texts: int = Field(
        256, ge=0, description="more held-out texts for the final, map-free quality (0: none)"
    )
    shuffle_buffer: int = Field(
        10_000, ge=1, description="texts per shuffled window of a stream (stream.py)"
    )

    @field_validator("files")
    @classmethod
    def _paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_path(value)


def source_problems(src: SourceSpec | DataSpec, where: str, streaming: bool) -> list[str]:
    """What a text source lacks: a hub dataset's name, the files of `files`; keys that belong to
    another kind of source."""
    p = []
    if src.source == "hub" and not src.name:
        p.append(f"{where}name: required when {where}source is 'hub' (a dataset id on the hub)")
    if src.source == "files" and not src.files:
        p.append(f"{where}files: required when {where}source is 'files' (.txt, .jsonl, .json,"
                 " .parquet files or folders of them)")  # fmt: skip
    if src.source != "files" and src.files:
        p.append(f"{where}files: only for {where}source 'files' (it is {src.source!r})")
    if src.source != "hub" and src.name:
        p.append(f"{where}name: only for {where}source 'hub' (it is {src.source!r})")
    if streaming and src.source in PACKAGED_SOURCES:
        p.append(f"data.streaming: the packaged {src.source} are read into memory; use hub or"
                 " files, or name them in data.sources (a mixture streams what can stream)")  # fmt: skip
    return p


def data_problems(d: DataSpec) -> list[str]:
    """One source or a mixture, each source complete."""
    if d.source is None and not d.sources:
        return ["data: name a text source (data.source) or several (data.sources, with weights)"]
    if d.source is not None and d.sources:
        return [f"data.source: {d.source!r} and data.sources name the text twice; give one"
                " source or a list of sources"]  # fmt: skip
    if d.sources and (d.files or d.name or d.config):
        return ["data.files / data.name / data.config: in a mixture each source has its own"]
    if not d.sources:
        return source_problems(d, "data.", d.streaming)
    return [x for i, s in enumerate(d.sources) for x in source_problems(s, f"data.sources[{i}].",
                                                                        False)]  # fmt: skip


class TargetShape(_Frozen):
    """The student's final shape. Uniform widths, so it is a stock config of the teacher's family."""

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
    progressive_slim: bool = Field(
        False,
        description="cut the pruned structures out of the student, its optimizer and importance"
        " state at every pruning event, so that training gets cheaper as the student shrinks",
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
    similarity: float = Field(
        0.0,
        ge=0.0,
        description="head-less teachers: MSE of the in-batch pairwise cosine similarities of the"
        " shipped sentence embeddings (no learned map)",
    )
    embedding: float = Field(
        0.0,
        ge=0.0,
        description="head-less teachers: 1 - cosine of the shipped sentence embedding (no map)"
        " and the teacher's in the hidden dims the student keeps",
    )
    hidden: float = Field(1.0, ge=0.0)
    attention: float = Field(1.0, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    student_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout in the student's training forward (not in eval)"
    )


class TrainSpec(_Frozen):
    # upper bounds: far past any distillation this package runs (weeks of a large GPU), short of
    # requests that would spin or allocate until the machine gives up
    steps: int = Field(ge=1, le=MAX_STEPS)
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH)
    lr: float = Field(3e-4, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)  # decay would pull the student off the teacher
    freeze_word_embeddings: bool = Field(
        False,
        description="keep the teacher's word embeddings (they still score and lose hidden dims):"
        " words rare in the distillation text keep their meaning",
    )
    adam_betas: tuple[Beta, Beta] = (0.9, 0.999)
    adam_eps: float = Field(1e-6, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    seed: int = Field(0, ge=0, lt=MAX_SEED)
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
    batch_sizes: tuple[Size, ...] = Field((1, 4), min_length=1)
    seq_lengths: tuple[Size, ...] = Field((16, 128), min_length=1)


class BenchSpec(_Frozen):
    """Latency of student vs teacher, each timed in its own process."""

    enabled: bool = True
    batch_sizes: tuple[Size, ...] = Field((1,), min_length=1)
    seq_lengths: tuple[Size, ...] = Field((128,), min_length=1)
    threads: int = Field(2, ge=1)
    warmup: int = Field(5, ge=0)
    iters: int = Field(30, ge=1)
    rounds: int = Field(2, ge=1, description="teacher and student alternate round by round")
    max_spread: float = Field(
        0.1,
        gt=0.0,
        description="noise bound: (p75 - p25) / p50 of a model's calls; above it the benchmark is"
        " measured again, and marked noisy if it stays above",
    )
    remeasure: int = Field(2, ge=0, le=10, description="extra attempts when a measurement is noisy")
    torch_baseline: bool = True


class OutputSpec(_Frozen):
    dir: str = Field("runs", min_length=1)

    @field_validator("dir")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_path(value)


class SpeedupGate(_Frozen):
    """The onnxruntime fp32 p50 speedup at a benchmarked (batch, seq), by default the first."""

    speedup: float = Field(gt=0.0)
    batch: Size | None = None
    seq: Size | None = None


class QualityGate(_Frozen):
    """The teacher's score minus the student's on a packaged task's validation split (linear
    probe, or zero-shot retrieval), measured by `compress eval`'s code; test is never read."""

    task: Literal[OFFLINE_TASKS]  # type: ignore[valid-type]
    max_drop: float = Field(
        ge=-1.0, le=1.0, description="absolute; negative asks the student to beat the teacher"
    )
    max_train: int = Field(2000, ge=10, description="probe training examples (stratified)")
    max_eval: int = Field(1000, ge=10, description="validation examples (retrieval: queries)")
    max_length: int = Field(64, ge=8, le=4096)


class GatesSpec(_Frozen):
    """Limits a finished run must meet; a miss exits 3 and nothing is registered (None: unchecked)."""

    max_params: int | None = Field(None, ge=1, description="student parameter count")
    min_speedup: SpeedupGate | None = Field(
        None,
        description="onnxruntime fp32 p50 speedup: a number (at the first benchmarked shape) or"
        " {speedup, batch, seq} at a benchmarked shape; a noisy measurement misses",
    )
    max_discrepancy: float | None = Field(None, ge=0.0, description="final held-out discrepancy")
    max_quality_drop: QualityGate | None = None

    @field_validator("min_speedup", mode="before")
    @classmethod
    def _scalar_speedup(cls, value: Any) -> Any:
        """The plain number form (at the first benchmarked shape)."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return {"speedup": value}
        if value is None or isinstance(value, dict | SpeedupGate):
            return value
        raise ValueError("expected a number, or {speedup, batch, seq} at a benchmarked shape")


with warnings.catch_warnings():  # `register` also names ABCMeta.register; fields are unaffected
    warnings.filterwarnings("ignore", message='Field name "register"')

    class ZooSpec(_Frozen):
        register: bool = True
        dir: str | None = Field(None, min_length=1)  # default: $COMPRESS_ZOO, else ./zoo

        @field_validator("dir")
        @classmethod
        def _path(cls, value: str | None) -> str | None:
            return _check_path(value)


class Recipe(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=MAX_NAME_BYTES)
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
    return parse_recipe(read_recipe_yaml(path), source=cut(str(path)))


def read_recipe_yaml(path: str | Path) -> Any:
    """The parsed YAML of a recipe file; RecipeError for anything that is not a small YAML text."""
    source = cut(str(path))
    try:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(source, ["file not found"])
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(source, [f"larger than {MAX_RECIPE_BYTES} bytes; not a recipe"])
        data = path.read_bytes()
    except (OSError, ValueError) as err:  # too long a name, a NUL, no permission...
        raise RecipeError(source, [f"cannot read the file ({_os_reason(err)})"]) from None
    return parse_yaml(decode_text(data, source), source)


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 text (a byte-order mark is allowed); RecipeError naming the line of a bad byte."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipeError(source, ["the file is UTF-16; save it as UTF-8"])
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise RecipeError(source, [f"line {line}: a NUL byte (UTF-16 or binary?); save as UTF-8"])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise RecipeError(
            source,
            [f"line {line}, column {column}: byte 0x{data[err.start]:02x} is not UTF-8;"
             " save the recipe as UTF-8"],
        ) from None  # fmt: skip


def parse_yaml(text: str, source: str) -> Any:
    """YAML with bounded nesting and bounded alias expansion, or RecipeError."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader already refuses control characters
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise RecipeError(source, [f"not valid YAML: {shown_yaml_error(err)}"]) from None
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError,
            RecursionError) as err:  # fmt: skip
        # a constructor's own error: an out-of-range or empty !!timestamp, an int of 5000 digits
        reason = f"{type(err).__name__}: {cut(str(err))}"
        raise RecipeError(source, [f"not valid YAML: {reason}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


if yaml.__with_libyaml__:  # libyaml's event parser: iterative, and 7x faster than PyYAML's
    from yaml._yaml import CParser as _EventParser
else:

    class _EventParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
        def __init__(self, stream: str):
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)


class _BoundedLoader(
    yaml.composer.Composer, _EventParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver
):
    """A safe loader (PyYAML's own composer, constructor and resolver) that refuses a document
    nested deeper than MAX_YAML_DEPTH or larger than MAX_YAML_NODES values once its aliases are
    expanded (an alias bomb), and an alias inside its own anchor. Each node's expanded height and
    size are computed as it is composed, from its children's, so nothing is ever expanded and
    nothing recurses deeper than the document."""

    def __init__(self, stream: str):
        _EventParser.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (height, expanded size)

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            if anchor in self.anchors and id(self.anchors[anchor]) not in self._measured:
                raise self._refuse(
                    f"the alias *{anchor[:SHOWN_CHARS]} is inside its own anchor", mark
                )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        height, size = self._measure(node)
        if self._depth + height > MAX_YAML_DEPTH:
            raise self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels (aliases)", mark)
        if size > MAX_YAML_NODES:
            raise self._refuse(
                f"more than {MAX_YAML_NODES} values (aliases expanded); not a recipe", mark
            )
        return node

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        if id(node) not in self._measured:
            children = [
                c
                for item in (node.value if isinstance(node.value, list) else [])
                for c in (item if isinstance(item, tuple) else (item,))
            ]
            kids = [self._measured.get(id(c), (1, 1)) for c in children]
            height = 1 + max((h for h, _ in kids), default=0)
            size = min(1 + sum(n for _, n in kids), MAX_YAML_NODES + 1)
            self._measured[id(node)] = (height, size)
        return self._measured[id(node)]

    @staticmethod
    def _refuse(problem: str, mark) -> yaml.YAMLError:
        return yaml.composer.ComposerError(None, None, problem, mark)


def shown_yaml_error(err: yaml.YAMLError) -> str:
    """PyYAML's message with its source snippet dropped and cut to a few lines."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + cut(str(problem))


def _os_reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or cut(str(err))


def load_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run (or a zoo entry) was started with."""
    path = require_run_dir(run_dir) / RECIPE_FILE
    raw = read_recipe_yaml(path)
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        raw["data"].setdefault("pack", False)  # resolved before data.pack existed: unpacked
    return parse_recipe(raw, str(path))


def recipe_differences(made: Recipe, wanted: Recipe, ignore: tuple[str, ...] = ()) -> list[str]:
    """`section.key: made -> wanted` for every key where two resolved recipes differ, the
    `section.key`s in `ignore` aside."""
    a, b = recipe_to_dict(made), recipe_to_dict(wanted)
    out = []
    for section in sorted(a.keys() | b.keys()):
        x, y = a.get(section), b.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{section}.{k}: {x.get(k)!r} -> {y.get(k)!r}"
                    for k in sorted(x.keys() | y.keys())
                    if x.get(k) != y.get(k) and f"{section}.{k}" not in ignore]  # fmt: skip
        elif x != y:
            out.append(f"{section}: {x!r} -> {y!r}")
    return out


# keys that change how fast a run goes, never what it computes (the plan and the scores do not
# depend on the thread count: tests/test_signal.py, docs/compare/default-recipe.md), so a run made
# with another value is the same run
RESULT_NEUTRAL = ("train.threads",)


def require_same_recipe(run_dir: Path, wanted: Recipe) -> Path:
    """The run directory, if it was made with `wanted` (keys in RESULT_NEUTRAL aside); otherwise a
    RunDirError naming the keys."""
    if diff := recipe_differences(load_run_recipe(run_dir), wanted, ignore=RESULT_NEUTRAL):
        raise RunDirError(
            f"{run_dir} was made with another recipe ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}): remove it or choose another output directory"
        )
    return run_dir


def with_overrides(base: Recipe, overrides: list[str]) -> Recipe:
    """The recipe with `section.key=value` (or top-level `key=value`) overrides, values parsed as
    YAML and held to the type the recipe has there (a boolean is not a number, nor the reverse),
    then re-validated."""
    if not overrides:
        return base
    raw = recipe_to_dict(base)
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        path = key.strip().split(".")
        container = raw if len(path) == 1 else raw.get(path[0])
        if not sep or len(path) > 2 or not all(path) or not isinstance(container, dict):
            problems.append(
                f"--set {shown(item)}: expected section.key=value or key=value, e.g."
                " pruning.end_step=50 or name=my-run"
            )
            continue
        if len(path) == 1 and isinstance(container.get(path[0]), dict):
            problems.append(f"--set {shown(item)}: {path[0]} is a section; set one of its keys")
            continue
        try:
            parsed = parse_yaml(value, f"--set {shown(item)}")
        except RecipeError as err:
            problems += [f"--set {shown(item)}: the value is {p}" for p in err.problems]
            continue
        why = override_type_problem(container.get(path[-1]), parsed)
        if why:
            problems.append(f"--set {shown(item)}: {why}")
            continue
        container[path[-1]] = parsed
    if problems:
        raise RecipeError(base.name, problems)
    return parse_recipe(raw, cut(f"{base.name} with --set {' '.join(overrides)}"))


def override_type_problem(current: Any, new: Any) -> str | None:
    """Why `new` cannot replace `current` (the recipe's value there), or None. Only the kind is
    checked here (booleans vs numbers); ranges and the rest are the recipe's own validation."""
    if current is None or new is None:
        return None
    if isinstance(current, bool) and not isinstance(new, bool):
        return f"expected true or false, got {shown(new)}"
    if isinstance(current, int | float) and not isinstance(current, bool) and isinstance(new, bool):
        return f"expected a number, got the boolean {shown(new)}"
    return None


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(source, ["the recipe must be a mapping of sections (teacher, data, ...)"])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(e) for e in err.errors()]
        raise RecipeError(source, capped(problems + _section_problems(raw))) from None
    problems = cross_field_problems(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def capped(problems: list[str]) -> list[str]:
    """At most MAX_PROBLEMS problems, then a count of the rest."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS} more problems"]


def cross_field_problems(r: Recipe) -> list[str]:
    """Checks that span fields. Teacher-dependent checks live in `teacher_problems`."""
    p: list[str] = []
    if r.target.hidden % r.target.heads:
        p.append(
            f"target.hidden: {r.target.hidden} is not divisible by target.heads ({r.target.heads});"
            " a stock encoder config needs hidden == heads * head_dim"
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
    p += data_problems(r.data)
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
    p += gate_problems(r)
    d = r.distill
    if d.mlm + d.prediction + d.hidden + d.attention + d.similarity + d.embedding == 0:
        p.append("distill: every loss weight is 0; nothing would be learned")
    return p


def gate_problems(r: Recipe) -> list[str]:
    """A speedup gate needs the benchmark, at a shape it measures."""
    gate = r.gates.min_speedup
    if gate is None:
        return []
    if not r.bench.enabled:
        return ["gates.min_speedup: needs the benchmark; set bench.enabled: true"]
    if (gate.batch is None) != (gate.seq is None):
        return ["gates.min_speedup: give both batch and seq, or neither (the first shape)"]
    grid = [(b, t) for b in r.bench.batch_sizes for t in r.bench.seq_lengths]
    if gate.batch is not None and (gate.batch, gate.seq) not in grid:
        shapes = ", ".join(f"batch {b} seq {t}" for b, t in grid)
        return [
            f"gates.min_speedup: batch {gate.batch} seq {gate.seq} is not benchmarked"
            f" (bench.batch_sizes x bench.seq_lengths: {shapes})"
        ]
    return []


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
    """Checks the target against the teacher's config (a dict of its fields, teacher.
    checked_config's: a supported family, sizes filled in)."""
    p: list[str] = []
    full = Shape.of_config(teacher)
    t_layers, t_hidden, t_heads, t_ffn = full.layers, full.hidden, full.heads, full.ffn
    t_head_dim = full.head_dim
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
    positions = architecture_for(teacher).max_tokens(teacher)
    for key, sizes in (
        ("data.max_length", (r.data.max_length,)),
        ("export.seq_lengths", r.export.seq_lengths if r.export.onnx else (0,)),
        ("bench.seq_lengths", r.bench.seq_lengths if r.bench.enabled else (0,)),
    ):
        if max(sizes) > positions:
            p.append(
                f"{key}: {max(sizes)} is longer than the teacher's {positions} positions"
                " (max_position_embeddings)"
            )
    if r.distill.mlm > 0 and not config_has_mlm_head(teacher):
        p.append(
            f"distill.mlm: {r.distill.mlm} needs a teacher with a masked-LM head;"
            f" this teacher is {teacher.get('architectures')}. Set distill.mlm: 0"
        )
    if r.distill.similarity > 0 and config_has_mlm_head(teacher):
        p.append(
            "distill.similarity: the similarity term is for sentence encoders (head-less"
            " teachers); an MLM teacher is matched by distill.prediction. Set distill.similarity: 0"
        )
    if r.distill.embedding > 0 and config_has_mlm_head(teacher):
        p.append(
            "distill.embedding: the embedding term is for sentence encoders (head-less"
            " teachers); an MLM teacher is matched by distill.prediction. Set distill.embedding: 0"
        )
    return p


# ---------------------------------------------------------------------------- error formatting


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(_key(x) for x in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = err["loc"][:-1], _key(err["loc"][-1])
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
    value = shown(got) if not isinstance(got, dict) else "a mapping"
    msg = err["msg"] if len(err["msg"]) <= 2 * SHOWN_CHARS else cut(err["msg"])
    return f"{loc}: {msg} (got {value})"


def _key(part: Any) -> str:
    """One part of a dotted key as printed: a user's unknown key may be anything, so it is cut."""
    text = str(part)
    return text if len(text) <= SHOWN_CHARS and text.isprintable() else shown(part)


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
