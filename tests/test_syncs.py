"""A training step reads nothing from the device except where the loop logs, evaluates or saves
(issue 23): on a GPU every such read waits for the queued work (a host sync) and the next
step's kernels start late.

On the CPU there is no device to wait for, so the reads that would sync on a GPU are counted as
they are asked for: the ops that return a value to the host or whose output size depends on the
data (`.item()`, `bool()`, `int()`, `float()` of a tensor, `nonzero`, indexing by a boolean mask,
`masked_select`, `equal`, `unique`, `repeat_interleave`), seen by a dispatch mode, and
`Tensor.tolist` (which no op dispatches), when the project's own code asks for them (torch's
internals are trusted: AdamW reads its step counter from a host tensor). The real loop
(distill.py) runs a small MLM teacher's recipe with pruning events, layer fading and a long log
interval; each read is charged to the step the loop is in."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compressor import distill, pipeline
from compressor.prune.schedule import Schedule
from tests.helpers import SMALL_TEACHER, shrink, small_recipe, tiny_teacher

PACKAGE = str(Path(distill.__file__).parent)
aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
         aten.masked_select.default, aten.equal.default, aten._unique2.default,
         aten.unique_consecutive.default, aten.repeat_interleave.Tensor}  # fmt: skip
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
            aten._index_put_impl_.default}  # fmt: skip
STEPS, LOG_EVERY = 12, 12
# the frames between an op and the code that asked for it: this file, torch's dispatch to a mode
# (through its compile wrappers) and its Python tensor methods
MACHINERY = (__file__, "torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch.py",
             "torch/_ops.py", "torch/_tensor.py", "torch/overrides.py")  # fmt: skip


def asked_by_the_project(depth: int) -> str | None:
    """`file:line` of the innermost frame outside this file and torch's tensor and dispatch
    wrappers, when it is the project's code; None when torch's own code asked."""
    frame = sys._getframe(depth)
    while frame is not None and any(m in frame.f_code.co_filename for m in MACHINERY):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PACKAGE):
        return None
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


class Reads(TorchDispatchMode):
    """Counts the reads per step of the loop (None: outside the loop's steps)."""

    def __init__(self):
        super().__init__()
        self.step: int | None = None
        self.seen: dict[int | None, list[str]] = defaultdict(list)

    def note(self, what: str, depth: int) -> None:
        where = asked_by_the_project(depth + 1)
        if where is not None:
            self.seen[self.step].append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] or ())
        )
        if func in READS or boolean_index:
            self.note(str(func), 2)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def reads(monkeypatch):
    counter = Reads()
    real_lr_at, real_tolist = distill.lr_at, torch.Tensor.tolist

    def lr_at(step, *args):
        counter.step = step  # the loop asks for each step's learning rate first
        return real_lr_at(step, *args)

    def tolist(self):
        counter.note("Tensor.tolist", 1)
        return real_tolist(self)

    monkeypatch.setattr(distill, "lr_at", lr_at)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
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
