"""The measured side of a recipe's budget (`compress recipe check --probe`): time a few training
micro-batches on this device and predict the wall time of the run's training steps."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from compressor.bert_params import student_parameters
from compressor.budget import format_duration
from compressor.data import Batch
from compressor.distill import make_optimizer, prepare
from compressor.environment import pick_device
from compressor.forward import encode
from compressor.losses import HiddenMaps, StudentLoss, weighted_total
from compressor.pipeline import make_student
from compressor.prune.masks import Masks
from compressor.recipe import Recipe, load_recipe, with_overrides
from compressor.teacher import Teacher, load_teacher


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
    maps = HiddenMaps(teacher.shape.layers + 1, teacher.shape.hidden).to(device)
    masks = Masks.full(teacher.shape, device)
    fade = torch.nn.Parameter(masks.fade.clone())
    masks = replace(masks, fade=fade)
    model = StudentLoss(student, maps, fade, teacher.has_mlm_head)
    params = student_parameters(student)
    optimizer = make_optimizer(params, maps, r)
    bf16 = tr.precision == "bf16"
    g = torch.Generator().manual_seed(tr.seed)
    ids = torch.randint(1000, teacher.vocab.vocab, (tr.batch_size, r.data.max_length), generator=g)
    batch = prepare(Batch(ids, torch.ones_like(ids)), teacher, r, 0, 0).to(device)
    seconds = []
    for i in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            t_out = encode(teacher.model, batch.input_ids, batch.attention_mask,
                           with_logits=teacher.has_mlm_head)  # fmt: skip
        weighted_total(r.distill, model(r.distill, t_out, masks, batch, 0.0, bf16)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
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
