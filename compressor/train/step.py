"""The micro-step, written once: the teacher's forward, the student's loss terms against it, the
backward pass of their weighted total. Training, the noise floor, the importance probe and the
timing probe all run it."""

from __future__ import annotations

import torch

from compressor.checks import check_finite_losses
from compressor.data import Batch, Corpus, mask_tokens
from compressor.losses import weighted_total
from compressor.prune.masks import Masks
from compressor.recipe import DistillSpec, Recipe
from compressor.teacher import Teacher


def prepare(batch: Batch, teacher: Teacher, r: Recipe, step: int, micro: int) -> Batch:
    """Mask tokens for MLM teachers; the mask is a pure function of (seed, step, micro)."""
    if not teacher.has_mlm_head:
        return batch
    g = torch.Generator().manual_seed(r.train.seed * 1_000_003 + step * 101 + micro)
    return mask_tokens(batch, teacher.tokenizer, r.distill.mlm_probability, g)


def prepare_share(
    corpus: Corpus, teacher: Teacher, r: Recipe, step: int, micros: list[int], pin: bool = False
) -> list[tuple[int, Batch]]:
    """Micro-batches `micros` of step `step` (this process's share), collated and masked, each
    with its index; in pinned memory with `pin` (for a non-blocking copy to a GPU). Only these
    are collated and masked; the masks are those of the whole step's (a function of the seed,
    the step and the micro-batch's index)."""
    batches = corpus.step_batches(step, micros)
    out = [(m, prepare(b, teacher, r, step, m)) for m, b in zip(micros, batches, strict=True)]
    return [(m, b.pin_memory()) for m, b in out] if pin else out


def micro_step(
    d: DistillSpec,
    teacher: Teacher,
    model: torch.nn.Module,
    masks: Masks,
    batch: Batch,
    step: int,
    dropout: float = 0.0,
    bf16: bool = False,
    share: int = 1,
    check: bool = True,
) -> dict[str, torch.Tensor]:
    """Forward teacher and student on one micro-batch, backward the weighted loss divided by
    `share` (the micro-batches its gradients are averaged over). `model` is the training state's
    StudentLoss (under DDP: every backward goes through DDP's forward); `masks.fade` must be its
    fade. Returns each term and the total (detached, on the device). With `check`, a non-finite
    one stops training before anything learns from it; without, nothing is read from the device
    (the training loop checks its window of steps before anything is logged or saved:
    distill.py)."""
    t_out = teacher.encode(batch, bf16, logits_at=batch.label_index)  # the head where labels are
    losses = model(d, t_out, masks, batch, dropout, bf16)
    total = weighted_total(d, losses)
    values = {**{k: v.detach() for k, v in losses.items()}, "total": total.detach()}
    if check:
        check_finite_losses(step, {k: float(v) for k, v in values.items()})
    (total / share).backward()
    return values
