"""The pruner: when and what the student loses. It owns the noise floor every decision is held to,
the choice of the layers that stay, and the pruning events: at each event of the schedule the
masks shrink to the schedule's widths by scores shown to be above the noise floor, the layers
chosen for removal fade out, and (with `pruning.progressive_slim`) what the masks pruned is cut
out of the student."""

from __future__ import annotations

from dataclasses import replace
from itertools import islice
from typing import Any

import torch

from compressor import distributed
from compressor.checks import check_progressive_slim
from compressor.data import Batch, Corpus
from compressor.errors import CheckFailed
from compressor.forward import EncoderOutput, encode, encode_without_each
from compressor.losses import prediction_kl, representation_cosine
from compressor.prune.importance import (
    entry_scores,
    instant_importance,
    magnitudes,
    noise_floor,
    signal_margins,
    structure_scores,
    truncation_scores,
    update_state,
)
from compressor.prune.masks import (
    Masks,
    greedy_layer_removal,
    prune_to,
    select_layers,
    zero_pruned_weights,
)
from compressor.prune.progressive import Units
from compressor.prune.schedule import Schedule
from compressor.recipe import Recipe
from compressor.shapes import Shape
from compressor.teacher import Teacher
from compressor.train.state import FADE, TrainingState, rng_state, set_rng_state
from compressor.train.step import micro_step, prepare

Floors = dict[str, dict[str, float]]  # per signal ("ema", "probe"), per structure kind


class Pruner:
    def __init__(
        self,
        recipe: Recipe,
        teacher: Teacher,
        corpus: Corpus,
        schedule: Schedule,
        heldout: Batch,
        device: torch.device,
    ):
        self.recipe, self.teacher, self.corpus = recipe, teacher, corpus
        self.schedule, self.heldout, self.device = schedule, heldout, device
        self.floor: Floors | None = None  # None: the student never equalled its teacher
        self.layers_chosen = False

    def stored(self) -> dict[str, Any]:
        """The checkpoint fields the pruner fills (checkpoint.Checkpoint)."""
        return {"layers_chosen": self.layers_chosen, "noise_floor": self.floor}

    def restore(self, layers_chosen: bool, noise_floor: Floors | None) -> None:
        self.layers_chosen, self.floor = bool(layers_chosen), noise_floor

    def measure_noise_floor(self, state: TrainingState, batch: Batch) -> dict:
        """The floors the EMA's scores (training precision) and the probe's scores (always fp32)
        are held to, measured while the student still equals its teacher; none when it does not
        start as its teacher (its gradients are real). Returns the log record."""
        r = self.recipe
        if r.student.init == "teacher" and r.pruning.importance == "sensitivity":
            fp32 = self.rounding_noise(state, batch, bf16=False)
            low = fp32 if r.train.precision == "fp32" else self.rounding_noise(state, batch, True)
            self.floor = {"ema": low, "probe": fp32}
        return {"step": 0, "event": "noise_floor", "floor": self.floor}

    def step(self, step: int, state: TrainingState) -> list[dict]:
        """Everything the pruner does before the training work of `step`; the log records."""
        records = []
        event = self.schedule.is_event(step)
        if event:
            records.append(self.prune(step, state))
        if self.layers_chosen:
            state.fade_layers(self.schedule.layer_fade(step))
        if event and self.recipe.pruning.progressive_slim:
            records += self.slim(step, state)
        return records

    def prune(self, step: int, state: TrainingState) -> dict:
        """Shrink the masks to the schedule's widths (never grow them), from scores shown to be
        above the noise floor; choose the layers that stay at the first event."""
        full, target = self.schedule.full, self.schedule.target
        source, scores, margins = self.signal(step, state)
        record = {"step": step, "event": "prune", "signal": source, "margins": margins}
        if not self.layers_chosen and target.layers < full.layers:
            kept, why = self.choose_layers(step, state, scores[FADE])
            state.set_masks(replace(state.masks, layers=kept.to(self.device)))
            self.layers_chosen = True
            record |= {"layers_kept": kept.nonzero().flatten().tolist(), **why}
        widths = self.schedule.widths_at(step)
        ranked = rank_structures(self.recipe.pruning.importance, state.student, scores,
                                 state.masks.tensor_shape(), state.masks.layers)  # fmt: skip
        state.set_masks(prune_to(state.masks, ranked, widths))
        distributed.check_identical(state.masks.to_dict(), f"the masks pruned at step {step}")
        zero_pruned_weights(state.student, state.masks)
        return {**record, **widths.to_dict()}

    def slim(self, step: int, state: TrainingState) -> list[dict]:
        """Progressive slimming: cut what the masks pruned (and the layers faded to 0) out of the
        student and its state, then check that it computes what it did masked."""
        cut = Units.kept(state.masks)
        if cut.is_identity_of(state.masks.tensor_shape()):
            return []
        distributed.check_identical(cut.to_dict(), f"the units cut at step {step}")
        held = self.heldout
        with torch.no_grad():
            before = encode(state.student, held.input_ids, held.attention_mask, state.masks)
        state.cut(cut)
        with torch.no_grad():
            after = encode(state.student, held.input_ids, held.attention_mask, state.masks)
        diff = check_progressive_slim(before, after, cut.hidden, held.attention_mask, step)
        return [{"step": step, "event": "slim", "masked_vs_slim_max_abs": diff,
                 **state.masks.tensor_shape().to_dict()}]  # fmt: skip

    # ------------------------------------------------------------------ the signal

    def signal(self, step: int, state: TrainingState) -> tuple[str, dict, dict[str, float]]:
        """The scores an event decides from, which signal they are and their margin over the
        noise floor per structure kind.

        Sensitivity comes from the importance EMA once it has `pruning.min_history` updates and
        clears the margin; otherwise probe batches are added to it (dropout batches; nothing but
        the importance state is updated), after resetting it if what it held did not clear the
        margin. A probe that does not clear the margin is an error: no decision is ever taken
        from rounding noise. `magnitude` and `truncate` need no gradient and no floor."""
        p, importance = self.recipe.pruning, state.importance
        if p.importance == "truncate":
            return "truncate", dict(importance.i_bar), {}
        if p.importance == "magnitude":
            return "magnitude", magnitudes(state.tensors), {}
        floors = self.floor or {"ema": None, "probe": None}
        margins = self.margins(state, floors["ema"])
        clear = min(margins.values()) >= p.min_signal_margin
        if importance.steps >= p.min_history and clear:
            return "ema", entry_scores(importance, p.uncertainty), margins
        if not clear:
            importance.reset()  # what it holds is not signal: start afresh
        self.probe(step, state)
        margins = self.margins(state, floors["probe"])
        weak = {k: v for k, v in margins.items() if not v >= p.min_signal_margin}
        if weak:
            shown = ", ".join(f"{k} {v:.3g}" for k, v in weak.items())
            raise CheckFailed(
                f"pruning at step {step}: the probe's importance is not above the noise floor"
                f" (margin {shown}; needed {p.min_signal_margin}). Raise pruning.probe_batches or"
                " pruning.probe_dropout; no decision is taken from rounding noise"
            )
        # a short probe has no history for PLATON's uncertainty term: rank by its mean importance
        return "probe", importance.mean_importance(p.beta1), margins

    def margins(self, state: TrainingState, floor: dict[str, float] | None) -> dict[str, float]:
        """Per structure kind (and the layer fades), the margin of the mean importance seen so far
        over the noise floor. Without a floor every margin is infinite: the gradients are real."""
        masks = state.masks
        mean = state.importance.mean_importance(self.recipe.pruning.beta1)
        head_dim = masks.qk.shape[2]  # the student's own, once a progressive slim cut it
        kinds = {**structure_scores(state.student, mean, head_dim, masks.layers),
                 "layers": mean[FADE]}  # fmt: skip
        if floor is None:
            return {k: float("inf") for k in kinds}
        alive = {
            "hidden": masks.hidden,
            "heads": masks.heads,
            "qk": masks.qk & masks.heads[..., None],
            "vo": masks.vo & masks.heads[..., None],
            "ffn": masks.ffn,
            "layers": torch.ones_like(masks.layers),
        }
        return signal_margins(kinds, floor, alive)

    def rounding_noise(self, state: TrainingState, batch: Batch, bf16: bool) -> dict[str, float]:
        """The importance that rounding noise alone produces: one backward pass of the student
        while it still equals the teacher (no dropout), in fp32 or under bf16 autocast. Every
        process measures the same batch (through DDP: the same averaged gradients)."""
        batch = prepare(batch, self.teacher, self.recipe, -1, 0).to(self.device)
        # the distillation terms only: they sit at their minimum at the teacher, the MLM loss
        # does not (its gradient there is real, not noise)
        d = self.recipe.distill.model_copy(update={"mlm": 0.0})
        micro_step(d, self.teacher, state.model, state.masks, batch, 0, bf16=bf16)
        tensors = state.tensors
        noise = {n: instant_importance(t, t.grad, "sensitivity") for n, t in tensors.items()}
        state.model.zero_grad(set_to_none=True)
        head_dim = self.teacher.shape.head_dim
        return noise_floor({**structure_scores(state.student, noise, head_dim),
                            "layers": noise[FADE]})  # fmt: skip

    def probe(self, step: int, state: TrainingState) -> None:
        """Fresh sensitivity when the EMA has too little history (above all while the student
        still equals the teacher, where every loss gradient is rounding noise): a few
        forward/backward passes with dropout in the student give |theta * grad| a real signal.
        Always in fp32, so the decisions it feeds do not depend on the training precision.
        Nothing is updated but the importance state. Every process probes the same batches with
        rank 0's dropout masks, so the averaged gradients equal a single process's."""
        p, r = self.recipe.pruning, self.recipe
        set_rng_state(distributed.from_main(rng_state(self.device)), self.device)
        for micro_batches in islice(self.corpus.batches(step), p.probe_batches):
            batch = prepare(micro_batches[0], self.teacher, r, step, 0).to(self.device)
            micro_step(r.distill, self.teacher, state.model, state.masks, batch, step,
                       dropout=p.probe_dropout)  # fmt: skip
            update_state(state.importance, state.tensors, "sensitivity", p.beta1, p.beta2)
            state.model.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ layers

    def choose_layers(
        self, step: int, state: TrainingState, fade_scores: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        """The layers that stay (irreversible), and what decided it, for the metrics log."""
        p, keep, teacher = self.recipe.pruning, self.recipe.target.layers, self.teacher
        if p.layer_selection != "removal":
            return select_layers(fade_scores.cpu(), keep, p.layer_selection), {}
        batches = [
            prepare(b[0], teacher, self.recipe, step, 0).to(self.device)
            for b in islice(self.corpus.batches(step), max(1, p.probe_batches))
        ]
        targets = [teacher.encode(b) for b in batches]
        masks = state.masks

        def round_costs(kept: torch.Tensor) -> dict[int, float]:
            """Per kept layer, the discrepancy of the final output with it and the other layers
            faded out (forward only); rank 0's, so that every process takes the same decision."""
            trial = replace(masks, layers=kept.to(self.device), fade=kept.to(masks.fade))
            with torch.no_grad():
                per_batch = [without_each_discrepancy(teacher, state.student, trial, b, t)
                             for b, t in zip(batches, targets, strict=True)]  # fmt: skip
            return {i: distributed.from_main(sum(d[i] for d in per_batch) / len(batches))
                    for i in per_batch[0]}  # fmt: skip

        kept, rounds = greedy_layer_removal(masks.layers.numel(), keep, round_costs)
        return kept, {"layer_removal_costs": rounds}


def without_each_discrepancy(
    teacher: Teacher, student: torch.nn.Module, masks: Masks, batch: Batch, t: EncoderOutput
) -> dict[int, float]:
    """For each layer the masks keep, the map-free discrepancy of the final output at the
    teacher's width with that layer faded out too: KL of MLM predictions, or 1 - cosine of the
    mean-pooled sentence embeddings."""
    outs = encode_without_each(student, batch.input_ids, batch.attention_mask, masks,
                               with_logits=teacher.has_mlm_head)  # fmt: skip
    if teacher.has_mlm_head:
        mask = batch.attention_mask.bool()
        return {i: float(prediction_kl(t.logits, s.logits, mask, 1.0)) for i, s in outs.items()}
    return {i: float(representation_cosine(s.hidden_states[-1], t.hidden_states[-1],
                                           batch.attention_mask))
            for i, s in outs.items()}  # fmt: skip


def rank_structures(
    kind: str,
    student: torch.nn.Module,
    scores: dict[str, torch.Tensor],
    full: Shape,
    layers_kept: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Structure scores for `prune_to`: width truncation (first k), or the entry scores summed
    per structure (sensitivity or magnitude)."""
    if kind == "truncate":
        return {k: v.to(layers_kept.device) for k, v in truncation_scores(full).items()}
    return structure_scores(student, scores, full.head_dim, layers_kept)
