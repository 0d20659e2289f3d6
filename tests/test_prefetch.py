"""Data prepared for the loop (issue 23, behaviour 5): each process collates and masks only its
share of a step's micro-batches, the same batches the whole step's collation gave it; the
prefetching worker yields exactly what the synchronous path yields, from any step, and an error
on its thread surfaces in the loop."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from compressor import data, distributed, pipeline
from compressor.data import Batch, Corpus
from compressor.errors import DataError
from compressor.prefetch import THREAD_NAME, Prefetcher
from compressor.recipe import DataSpec
from compressor.train.step import prepare, prepare_share
from tests.helpers import fake_texts, shrink, small_recipe, small_teacher, tiny_teacher

ACCUM, BATCH = 4, 2


@pytest.fixture(scope="module")
def teacher(packaged_tokenizer):
    return tiny_teacher(packaged_tokenizer, name="tiny-mlm", mlm=True)


@pytest.fixture(scope="module")
def recipe():
    return shrink(small_recipe(), train=dict(batch_size=BATCH, grad_accum=ACCUM),
                  distill=dict(mlm=1.0, prediction=1.0))  # fmt: skip


def corpus_of(tmp_path, tok, streaming: bool) -> Corpus:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(fake_texts(80)) + "\n")
    spec = DataSpec(source="files", files=(str(path),), max_length=24, heldout=3, quality_texts=2,
                    streaming=streaming, shuffle_buffer=16)  # fmt: skip
    return Corpus(spec, tok, seed=0, batch_size=BATCH, accum=ACCUM)


def same(a: Batch, b: Batch) -> bool:
    """Bit for bit the same batch (every field, dtype and shape)."""
    fields = ("input_ids", "attention_mask", "labels", "label_index")
    pairs = [(getattr(a, f), getattr(b, f)) for f in fields]
    return all((x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype
                                             and torch.equal(x, y)) for x, y in pairs)  # fmt: skip


def whole_step(corpus: Corpus, teacher, recipe, step: int) -> list[Batch]:
    """Step `step` as the loop prepared it before: every micro-batch collated, then masked."""
    return [prepare(b, teacher, recipe, step, m) for m, b in enumerate(next(corpus.batches(step)))]


@pytest.mark.parametrize("streaming", [False, True])
def test_each_rank_collates_and_masks_only_its_micro_batches(
    streaming, tmp_path, packaged_tokenizer, teacher, recipe, monkeypatch
):
    corpus = corpus_of(tmp_path, packaged_tokenizer, streaming)
    want = {s: whole_step(corpus, teacher, recipe, s) for s in range(4)}  # a stream: in order
    collated, masked = [], []
    real_collate, real_mask = data.collate, data.mask_tokens
    monkeypatch.setattr(data, "collate", lambda seqs, pad: collated.append(len(seqs))
                        or real_collate(seqs, pad))  # fmt: skip
    monkeypatch.setattr("compressor.train.step.mask_tokens",
                        lambda b, *a: masked.append(b) or real_mask(b, *a))  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        micros = distributed.my_micros(ACCUM)
        assert micros == [rank, rank + 2]
        for step in want:
            collated.clear(), masked.clear()
            share = prepare_share(corpus, teacher, recipe, step, micros)
            assert collated == [BATCH, BATCH] and len(masked) == 2  # its two, not all four
            assert [m for m, _ in share] == micros
            assert all(same(b, want[step][m]) for m, b in share)


# ---------------------------------------------------------------------------- the worker


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("start", [0, 5])
def test_the_worker_yields_what_the_synchronous_path_yields(
    streaming, start, tmp_path, packaged_tokenizer, teacher, recipe
):
    """Bit for bit, from step 0 and from a resumed step (a fresh corpus restored to the position
    a checkpoint at that step saves), with the probes reading the same corpus meanwhile."""
    micros, n = list(range(ACCUM)), 6
    reference = corpus_of(tmp_path, packaged_tokenizer, streaming)
    want = [prepare_share(reference, teacher, recipe, s, micros) for s in range(start + n)]
    corpus = corpus_of(tmp_path, packaged_tokenizer, streaming)
    corpus.restore(start, reference.position(start))  # as `distill.restore` does
    steps = range(start, start + n)
    with Prefetcher(lambda s: prepare_share(corpus, teacher, recipe, s, micros), steps) as ahead:
        for s in steps:
            got = ahead.get(s)
            next(corpus.batches(s))  # a pruning probe reads the step (and the stream) meanwhile
            assert [m for m, _ in got] == micros
            assert all(same(b, w) for (_, b), (_, w) in zip(got, want[s], strict=True))


def test_the_worker_stays_at_most_a_step_ahead_and_stops_with_the_loop():
    made = []

    def make(step: int) -> int:
        made.append(step)
        return step * 10

    with (
        pytest.raises(KeyError, match="the loop failed"),
        Prefetcher(make, range(100), ahead=1) as ahead,
    ):
        assert ahead.get(0) == 0
        deadline = time.monotonic() + 10
        while len(made) < 3 and time.monotonic() < deadline:  # it runs ahead as far as it may
            time.sleep(0.01)
        time.sleep(0.2)
        assert made == [0, 1, 2]  # step 1 waiting in the queue, step 2 made, waiting to go in
        assert ahead.get(1) == 10
        raise KeyError("the loop failed")
    assert not alive(), "the worker outlived the loop"
    assert len(made) <= 4


def test_an_error_on_the_worker_is_raised_in_the_loop_naming_the_step():
    def make(step: int) -> int:
        if step == 2:
            raise DataError("data: cannot read the stream (a broken file)")
        return step

    with Prefetcher(make, range(5)) as ahead:
        assert [ahead.get(0), ahead.get(1)] == [0, 1]
        with pytest.raises(DataError, match="a broken file") as raised:
            ahead.get(2)
    assert "compress-prefetch thread, preparing the data of step 2" in str(raised.value.__notes__)
    assert not alive()


def alive() -> bool:
    return any(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate())


def test_the_loop_raises_a_worker_error_and_leaves_no_thread(
    tmp_path, packaged_tokenizer, monkeypatch
):
    """Through the real loop (distill.py): the worker's error at step 3 ends the run with that
    error, and no worker thread is left."""
    real = Corpus.step_batches

    def step_batches(self, step, micros):
        if step == 3 and threading.current_thread().name == THREAD_NAME:
            raise DataError("data: cannot read the stream (a broken file)")
        return real(self, step, micros)

    monkeypatch.setattr(Corpus, "step_batches", step_batches)
    recipe = shrink(small_recipe(steps=6), train=dict(checkpoint_every=2))
    with pytest.raises(DataError, match="a broken file") as raised:
        pipeline.run(recipe, tmp_path, teacher=small_teacher(packaged_tokenizer))
    assert "preparing the data of step 3" in str(raised.value.__notes__)
    assert not alive()
