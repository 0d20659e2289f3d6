"""A corpus larger than memory: texts streamed through `datasets` (a hub dataset or local .txt,
.jsonl, .json, .parquet files), shuffled window by window, tokenised in batches a window ahead,
packed, looped over epochs, and resumable from a small saved position.

Order. The source is read in its own order. Its first `reserved` texts are the held-out ones; every
epoch starts right after them (from the source's state there, not by reading them again). The rest
is read in windows of `data.shuffle_buffer` texts; each window is permuted by a generator seeded
with (seed, epoch, window), tokenised in batched calls and packed (packing.py) on a thread, while
the steps use the window before it: tokenising is off the training loop's path. Tokens left at the
end of a window start the next window's first sequence, across epochs too. An epoch ends where the
source does and the next one starts over: the stream never runs out, the schedule (train.steps)
alone decides how much is read.

Position. Every sequence has a `Position`: (epoch, window, the source's state at the window's
start, the carry at the window's start, the sequences of the window before it). Restoring one
re-reads one window at most, so resuming costs the same at step 10 as at step 10**6 (datasets'
own resume re-scans the current shard of the source up to its offset, skipping whole tables).
datasets' shuffle buffer is not used: its content is not saved (datasets 5 refills it on resume),
so a resumed run would see other text.

`StepReader` hands out the sequences of each training step. The loop and the pruning probes ask
for the same steps, so the last few steps are kept, and the position of every recent step is
known: any of them can be asked for again, and the one after a checkpoint is saved with it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from compressor.errors import DataError
from compressor.packing import pack_texts
from compressor.recipe import DataSpec, cut

KEEP_STEPS = 16  # recent steps whose sequences are kept for a second reader (the probes)
KEEP_POSITIONS = 1024  # recent steps whose position is kept


@dataclass(frozen=True)
class Position:
    """The `offset`-th sequence packed from window `window` of epoch `epoch`; the window starts at
    the source's `state` with `carry` tokens left from before it."""

    epoch: int
    window: int
    state: dict[str, Any]
    carry: tuple[int, ...]
    offset: int

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "window": self.window, "state": self.state,
                "carry": list(self.carry), "offset": self.offset}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        return cls(int(d["epoch"]), int(d["window"]), d["state"], tuple(d["carry"]),
                   int(d["offset"]))  # fmt: skip


def open_source(spec: DataSpec, kind: str | None):
    """The `datasets` stream of a hub dataset, or of local files of `kind` (text, json, parquet)."""
    from datasets import load_dataset

    what = f"data.files (as {kind})" if kind else f"data.name '{cut(spec.name or '')}'"
    try:
        if kind:
            return load_dataset(kind, data_files=list(spec.files), split="train", streaming=True)
        return load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
    except Exception as err:  # datasets wraps every loader error in its own types
        raise DataError(f"{what}: cannot open as a stream ({reason(err)})") from None


def reason(err: BaseException) -> str:
    cause = err.__cause__ or err
    return cut(str(cause).splitlines()[0] if str(cause) else type(cause).__name__)


def window_order(n: int, seed: int, epoch: int, window: int) -> list[int]:
    """The seeded permutation of a window's texts."""
    return np.random.default_rng([seed, epoch, window]).permutation(n).tolist()


class TextStream:
    """The held-out texts, then the training sequences of every epoch from any `Position`."""

    def __init__(self, spec: DataSpec, tokenizer: Any, seed: int, kind: str | None = None):
        self.spec, self.tok, self.seed = spec, tokenizer, seed
        self.texts_read = 0  # training texts read from the source (resume tests count them)
        self.source = open_source(spec, kind)
        self._rows = self._texts(iter(self.source))
        reserved = spec.heldout + spec.quality_texts
        self.reserved: list[str] = list(islice(self._rows, reserved))
        if len(self.reserved) < reserved:
            raise DataError(
                f"data: the stream has only {len(self.reserved)} texts; need more than"
                f" data.heldout + data.quality_texts ({reserved})"
            )
        self.train_start: dict[str, Any] = self.source.state_dict()
        self.texts_read = 0
        self._live: tuple[int, int] | None = (0, 0)  # (epoch, window) the open reader is at
        self._reading = threading.Lock()
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress-tokenize")

    def position_from(self, saved: dict[str, Any]) -> Position:
        """A position that `Position.to_dict` saved (in a checkpoint)."""
        return Position.from_dict(saved)

    def _texts(self, rows) -> Iterator[str]:
        """The non-blank texts of the source; DataError for a missing or non-string field."""
        field = self.spec.text_field
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as err:  # a parser error of datasets, raised while streaming
                raise DataError(f"data: cannot read the stream ({reason(err)})") from None
            if field not in row:
                raise DataError(
                    f"data.text_field: '{cut(field)}' is not a column (columns: {list(row)})"
                )
            text = row[field]
            if text is not None and not isinstance(text, str):
                raise DataError(f"data: a '{cut(field)}' is {cut(repr(text))}, not a string")
            self.texts_read += 1
            if text and text.strip():
                yield text

    def _window(
        self, epoch: int, window: int, state: dict[str, Any]
    ) -> tuple[list[str], bool, dict[str, Any]]:
        """The texts of one window (from the open reader if it is there, else from `state`),
        whether the source ended in it, and the source's state after it."""
        if self._live != (epoch, window):
            self.source.load_state_dict(state)
            self._rows = self._texts(iter(self.source))
        texts = list(islice(self._rows, self.spec.shuffle_buffer))
        ended = len(texts) < self.spec.shuffle_buffer
        self._live = None if ended else (epoch, window + 1)
        return texts, ended, self.source.state_dict()

    def _encode(self, texts: list[str], carry: Sequence[int]) -> tuple[Sequence, list[int]]:
        """The sequences of a window's texts (in order), and the carry after them."""
        if self.spec.pack:
            return pack_texts(self.tok, texts, self.spec.max_length, carry)
        return self.tok(texts, truncation=True, max_length=self.spec.max_length)["input_ids"], []

    def _prepared(
        self, epoch: int, window: int, state: dict[str, Any], carry: tuple[int, ...]
    ) -> tuple[Sequence, list[int], bool, dict[str, Any]]:
        """A window's sequences, the carry after them, whether the epoch ends with it and the
        source's state after it. Runs on the tokenising thread; one reader of the source at once."""
        with self._reading:
            texts, ended, after = self._window(epoch, window, state)
        order = window_order(len(texts), self.seed, epoch, window)
        seqs, left = self._encode([texts[i] for i in order], carry)
        return seqs, left, ended, after

    def sequences(self, start: Position | None = None) -> Iterator[tuple[Sequence[int], Position]]:
        """Every sequence from `start` (None: the first) on, each with the position of the next.
        The next window is read and tokenised on a thread while this one's sequences are used."""
        pos = start or Position(0, 0, self.train_start, (), 0)
        epoch, window, state, carry, skip = pos.epoch, pos.window, pos.state, pos.carry, pos.offset
        whole, before, made = window == 0 and skip == 0, carry, 0  # whole: read from its start
        ahead = self._ahead.submit(self._prepared, epoch, window, state, carry)
        while True:
            seqs, left, ended, after = ahead.result()
            made += len(seqs)
            if ended and whole and made == 0 and tuple(left) == before:  # an epoch without a token
                raise DataError("data: the stream has no training text after the held-out texts")
            following = (epoch + 1, 0, self.train_start) if ended else (epoch, window + 1, after)
            ahead = self._ahead.submit(self._prepared, *following, tuple(left))
            for i in range(skip, len(seqs)):
                yield seqs[i], Position(epoch, window, state, carry, i + 1)
            (epoch, window, state), carry, skip = following, tuple(left), 0
            if ended:
                whole, before, made = True, carry, 0


class StepReader:
    """The sequences of training step s: the stream's sequences s*per_step .. (s+1)*per_step-1."""

    def __init__(self, stream: TextStream, per_step: int):
        self.stream, self.per_step = stream, per_step
        self._kept: OrderedDict[int, list] = OrderedDict()
        self._positions: OrderedDict[int, Position | None] = OrderedDict({0: None})
        self._reader: Iterator | None = None
        self._next = -1  # the step the open reader yields next

    def restore(self, step: int, position: Position | None) -> None:
        """Continue at `step` from a saved position (a checkpoint's)."""
        self._positions[step] = position

    def position(self, step: int) -> Position | None:
        """The position of step `step`'s first sequence; known for recent steps and the one after
        the last read (None: the stream's start)."""
        if step not in self._positions:
            raise RuntimeError(f"the data position of step {step} is no longer known")
        return self._positions[step]

    def sequences(self, step: int) -> list:
        if step in self._kept:
            return self._kept[step]
        if self._next != step:
            self._reader, self._next = self.stream.sequences(self.position(step)), step
        pairs = list(islice(self._reader, self.per_step))
        seqs = [seq for seq, _ in pairs]
        self._next = step + 1
        remember(self._kept, step, seqs, KEEP_STEPS)
        remember(self._positions, step + 1, pairs[-1][1], KEEP_POSITIONS)
        return seqs


def remember(d: OrderedDict, key: int, value: Any, keep: int) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > keep:
        d.popitem(last=False)
