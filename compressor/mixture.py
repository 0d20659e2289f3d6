"""A weighted mixture of text sources (data.sources), drawn reproducibly and resumable exactly.

Order. Every source yields its own training sequences: a source read into memory (packaged text,
files, a hub dataset) as seeded permutations, epoch after epoch (`MemorySource`); a streamed one
(hub or files with data.streaming) as stream.py reads it (`TextStream`). Each source has its own
seed, derived from the run's. The mixture's sequence i comes from source `choices(i)`: the sources
of a block of BLOCK sequences are drawn i.i.d. with probabilities proportional to the weights by a
generator seeded with (seed, block), so the draw of any sequence is a pure function of (seed, i).
A source takes the next of its own sequences whenever it is drawn.

Position. A `MixPosition` is (i, every source's own position): restoring one re-opens each source
where it was, so a resumed run continues exactly. It is what `Corpus.position` returns and a
checkpoint saves; `StepReader` (stream.py) hands out the sequences of each step as for one stream.

Held-out texts. Each source reserves its share (by weight, largest remainder) of data.heldout and of
data.quality_texts from its first texts (after its shuffle, for one in memory), never trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

BLOCK = 4096  # sequences whose sources are drawn at once


def shares(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split by `weights` (largest remainder; ties to the earlier source): sums to total."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - out), kind="stable")[: total - int(out.sum())]:
        out[k] += 1
    return out.tolist()


def choices(seed: int, block: int, weights: Sequence[float]) -> np.ndarray:
    """The sources of sequences block*BLOCK .. (block+1)*BLOCK - 1: i.i.d. by weight."""
    w = np.asarray(weights, dtype=np.float64)
    return np.random.default_rng([seed, block]).choice(len(w), size=BLOCK, p=w / w.sum())


def source_seed(seed: int, k: int) -> int:
    """Source k's own seed (its shuffles), distinct for every source of a run."""
    return seed * 1_000_003 + k + 1


class SourcePosition(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class Source(Protocol):
    """What the mixture needs of a source: its sequences from a position, each with the next."""

    def sequences(self, start: Any = None) -> Iterator[tuple[Sequence[int], Any]]: ...

    def position_from(self, saved: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class MemoryPosition:
    """The `offset`-th sequence of epoch `epoch`'s permutation."""

    epoch: int
    offset: int

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset}


class MemorySource:
    """Sequences held in memory, read as epochs of seeded permutations."""

    def __init__(self, seqs: Sequence[Sequence[int]], seed: int):
        self.seqs, self.seed = seqs, seed

    def order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs)).tolist()

    def sequences(
        self, start: MemoryPosition | None = None
    ) -> Iterator[tuple[Sequence[int], MemoryPosition]]:
        epoch, offset = (start.epoch, start.offset) if start else (0, 0)
        while True:
            order = self.order(epoch)
            for i in range(offset, len(order)):
                yield self.seqs[order[i]], MemoryPosition(epoch, i + 1)
            epoch, offset = epoch + 1, 0

    def position_from(self, saved: dict[str, Any]) -> MemoryPosition:
        return MemoryPosition(int(saved["epoch"]), int(saved["offset"]))


@dataclass(frozen=True)
class MixPosition:
    """The mixture's `index`-th sequence, every source at its own position (None: its start)."""

    index: int
    sources: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"mixture": self.index,
                "sources": [p.to_dict() if p is not None else None for p in self.sources]}  # fmt: skip


class MixedStream:
    """The training sequences of a mixture of `sources` drawn by `weights`."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], seed: int):
        self.sources, self.weights, self.seed = list(sources), list(weights), seed
        self._block: tuple[int, np.ndarray] | None = None

    def source_of(self, index: int) -> int:
        """Which source the mixture's sequence `index` comes from."""
        block = index // BLOCK
        if self._block is None or self._block[0] != block:
            self._block = (block, choices(self.seed, block, self.weights))
        return int(self._block[1][index % BLOCK])

    def sequences(
        self, start: MixPosition | None = None
    ) -> Iterator[tuple[Sequence[int], MixPosition]]:
        index = start.index if start else 0
        positions = list(start.sources) if start else [None] * len(self.sources)
        readers: list[Iterator | None] = [None] * len(self.sources)
        while True:
            k = self.source_of(index)
            if readers[k] is None:
                readers[k] = self.sources[k].sequences(positions[k])
            seq, positions[k] = next(readers[k])
            index += 1
            yield seq, MixPosition(index, tuple(positions))

    def position_from(self, saved: dict[str, Any]) -> MixPosition:
        if "mixture" not in saved or len(saved["sources"]) != len(self.sources):
            raise ValueError("not a position of this mixture")
        return MixPosition(
            int(saved["mixture"]),
            tuple(s.position_from(p) if p is not None else None
                  for s, p in zip(self.sources, saved["sources"], strict=True)),
        )  # fmt: skip
