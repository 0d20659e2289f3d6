"""A training step reads nothing from the device except where the loop logs, evaluates or saves
(issue 23): on a GPU every such read waits for the queued work (a host sync) and the next
step's kernels start late.

On the CPU there is no device to wait for, so the reads that would sync on a GPU are counted as
the project's code asks for them (compressor/syncs.py `DeviceReads`: values read to the host,
`nonzero`, boolean-mask indexing, `Tensor.tolist`, ...). The real loop (distill.py) runs a small
MLM teacher's recipe with pruning events, layer fading and a long log interval; each read is
charged to the step the loop is in."""

from __future__ import annotations

import pytest

from compressor import distill, pipeline
from compressor.prune.schedule import Schedule
from compressor.syncs import DeviceReads
from tests.helpers import SMALL_TEACHER, shrink, small_recipe, tiny_teacher

STEPS, LOG_EVERY = 12, 12


@pytest.fixture
def reads(monkeypatch):
    counter = DeviceReads()
    real_lr_at = distill.lr_at

    def lr_at(step, *args):
        counter.step = step  # the loop asks for each step's learning rate first
        return real_lr_at(step, *args)

    monkeypatch.setattr(distill, "lr_at", lr_at)
    with counter:
        yield counter


def quiet_steps(recipe, teacher) -> list[int]:
    """The steps that neither prune nor log, evaluate or save."""
    tr = recipe.train
    sched = Schedule.of(recipe.pruning, teacher.shape, recipe.target.shape())
    every = (tr.log_every, tr.eval_every, tr.checkpoint_every)
    return [s for s in range(tr.steps)
            if not sched.is_event(s) and all((s + 1) % n for n in every) and s + 1 != tr.steps]  # fmt: skip


@pytest.mark.parametrize("slim", [False, True])
def test_no_device_read_between_log_steps(tmp_path, packaged_tokenizer, reads, slim):
    teacher = tiny_teacher(packaged_tokenizer, name="small-mlm", mlm=True, **SMALL_TEACHER)
    recipe = shrink(
        small_recipe(steps=STEPS, lr=1e-4),
        pruning=dict(start_step=0, end_step=4, interval=2, progressive_slim=slim),
        distill=dict(mlm=1.0, prediction=1.0),
        train=dict(log_every=LOG_EVERY, eval_every=LOG_EVERY, checkpoint_every=LOG_EVERY),
    )
    quiet = quiet_steps(recipe, teacher)
    assert quiet == [1, 3, 5, 6, 7, 8, 9, 10]  # fading steps (1, 3) and steps after the last event
    pipeline.run(recipe, tmp_path, teacher=teacher)
    assert len(reads.seen[0]) > 0 and len(reads.seen[STEPS - 1]) > 0  # the counter sees reads
    found = {s: reads.seen[s] for s in quiet if reads.seen[s]}
    assert not found, f"device reads in steps that should read nothing: {found}"
