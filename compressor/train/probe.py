"""The measured side of a recipe's budget (`compress recipe check --probe`): time a few training
micro-batches on this device and predict the wall time of the run's training steps."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.budget import format_duration
from compressor.data import Batch
from compressor.environment import pick_device
from compressor.recipe import Recipe, load_recipe, with_overrides
from compressor.teacher import Teacher, load_teacher
from compressor.train.state import TrainingState, make_student
from compressor.train.step import micro_step, prepare


@dataclass(frozen=True)
class StepProbe:
    micro_batch_seconds: list[float]  # each timed micro-batch
    grad_accum: int

    @property
    def step_seconds(self) -> float:
        """The median micro-batch time x the micro-batches of a step."""
        return statistics.median(self.micro_batch_seconds) * self.grad_accum


def probe_step(r: Recipe, teacher: Teacher, device: torch.device, repeats: int = 3) -> StepProbe:
    """Time the training work of one micro-batch on `device`: teacher forward, student forward
    and backward of the weighted loss, optimizer step. One untimed warm-up, then `repeats` timed.
    Random token ids of the recipe's shape (the time does not depend on the text); the masked
    forward computes at the teacher's width whatever the masks, so a step costs the same all along
    the schedule. Evaluations, pruning events and checkpoints are not included."""
    tr = r.train
    teacher.model.to(device)
    student = make_student(teacher, r.student.init, tr.seed).to(device)
    state = TrainingState.start(r, teacher.shape, student, device)
    state.wrap(teacher.has_mlm_head, device)
    bf16 = tr.precision == "bf16"
    g = torch.Generator().manual_seed(tr.seed)
    ids = torch.randint(1000, teacher.vocab.vocab, (tr.batch_size, r.data.max_length), generator=g)
    batch = prepare(Batch(ids, torch.ones_like(ids)), teacher, r, 0, 0).to(device)
    seconds = []
    for i in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        micro_step(r.distill, teacher, state.model, state.masks, batch, 0, bf16=bf16)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i:  # the first one warms up
            seconds.append(time.perf_counter() - start)
    return StepProbe(seconds, tr.grad_accum)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time_report(path: Path, overrides: list[str] = (), repeats: int = 3) -> str:
    """The wall time of the recipe's training steps on this device, predicted from `repeats`
    measured micro-batches (budget.probe_step). Loads the teacher."""
    recipe = with_overrides(load_recipe(path), list(overrides))
    teacher = load_teacher(recipe.teacher)
    device = pick_device(recipe.train.device)
    probe = probe_step(recipe, teacher, device, repeats)
    mb = probe.micro_batch_seconds
    total = probe.step_seconds * recipe.train.steps
    return (
        f"  wall time on {device} ({recipe.train.precision}): {format_duration(total)} for"
        f" {recipe.train.steps} steps of {probe.step_seconds:.3g} s ({recipe.train.grad_accum}"
        f" micro-batches of {recipe.train.batch_size} x {recipe.data.max_length}; probe: median of"
        f" {len(mb)} micro-batches, {min(mb):.3g}..{max(mb):.3g} s). Training steps only:"
        " evaluations, pruning events, checkpoints and the export add to it"
    )
