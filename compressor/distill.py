"""The HomoDistil loop: distill the student from the teacher while pruning it a little at a time.

Reads top to bottom. Every mask change is a visible line; there are no hooks. Step s (0-based):
teacher forward, student forward under the masks, loss, backward, importance update, optimizer
step, re-zero pruned weights, and, on pruning steps, shrink the masks to the schedule's widths.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

from compressor import schedule
from compressor.bert_params import pooler, student_parameters
from compressor.checkpoint import load_checkpoint, save_checkpoint
from compressor.data import Batch, Corpus, mask_tokens
from compressor.forward import EncoderOutput, encode
from compressor.importance import (
    EmaState,
    entry_scores,
    magnitudes,
    structure_scores,
    truncation_scores,
    update_state,
    with_magnitude_fallback,
)
from compressor.losses import (
    HiddenMaps,
    attention_kl,
    hidden_mse,
    mlm_cross_entropy,
    prediction_kl,
    representation_cosine,
)
from compressor.masks import Masks, prune_to, select_layers, zero_pruned_weights
from compressor.metrics import MetricsLog
from compressor.recipe import Recipe
from compressor.shapes import Shape, param_count
from compressor.teacher import Teacher

GATES = "__layer_gates__"


@dataclass
class DistillResult:
    masks: Masks
    maps: HiddenMaps
    steps_done: int


def target_shape(r: Recipe) -> Shape:
    t = r.target
    return Shape(t.layers, t.hidden, t.heads, t.head_dim, t.ffn)


def distill(
    recipe: Recipe,
    teacher: Teacher,
    student: torch.nn.Module,
    corpus: Corpus,
    run_dir: Path,
    device: torch.device,
    stop_after: int | None = None,
) -> DistillResult:
    r, p, tr = recipe, recipe.pruning, recipe.train
    full, target = teacher.shape, target_shape(recipe)
    params = student_parameters(student)
    maps = HiddenMaps(full.layers + 1, full.hidden).to(device)
    optimizer = make_optimizer(params, maps, recipe)
    masks = Masks.full(full, device)
    gates = masks.gates.clone().requires_grad_(True)
    importance = EmaState.zeros_like({**params, GATES: gates})
    layers_chosen, start = False, 0

    ckpt = load_checkpoint(run_dir)
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        maps.load_state_dict(ckpt["maps"])
        optimizer.load_state_dict(ckpt["optimizer"])
        masks = Masks.from_dict(ckpt["masks"], device)
        gates = masks.gates.clone().requires_grad_(True)
        importance = EmaState.from_dict(ckpt["importance"])
        layers_chosen, start = bool(ckpt["layers_chosen"]), int(ckpt["step"])
        torch.set_rng_state(ckpt["torch_rng"])
    log = MetricsLog(run_dir, resume_step=start if ckpt is not None else None)
    heldout = corpus.heldout.to(device)
    with torch.no_grad():
        teacher_heldout = encode(teacher.model, heldout.input_ids, heldout.attention_mask,
                                 with_logits=teacher.has_mlm_head)  # fmt: skip
    if start == 0:
        log.write(evaluate(0, teacher, student, maps, masks, heldout, teacher_heldout))

    def checkpoint(next_step: int) -> None:
        save_checkpoint(run_dir, {
            "step": next_step, "student": student.state_dict(), "maps": maps.state_dict(),
            "optimizer": optimizer.state_dict(), "masks": replace(masks, gates=gates.detach()).to_dict(),
            "importance": importance.to_dict(), "layers_chosen": layers_chosen,
            "torch_rng": torch.get_rng_state(),
        })  # fmt: skip

    batches = corpus.batches(start)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tr.precision == "bf16")
    last = min(tr.steps, stop_after) if stop_after is not None else tr.steps
    bar = tqdm(range(start, last), initial=start, total=tr.steps, desc="distill", unit="step")
    with graceful_interrupt() as interrupted:
        for step in bar:
            lr = schedule.lr_at(step, tr.lr, tr.warmup_steps, tr.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 1. forward teacher and student on each micro-batch, backward the weighted loss
            masks = replace(masks, gates=gates)
            terms: dict[str, float] = {}
            for micro, batch in enumerate(next(batches)):
                batch = prepare(batch, teacher, recipe, step, micro).to(device)
                with torch.no_grad(), autocast:
                    t_out = encode(teacher.model, batch.input_ids, batch.attention_mask,
                                   with_logits=teacher.has_mlm_head)  # fmt: skip
                with autocast:
                    s_out = encode(student, batch.input_ids, batch.attention_mask, masks,
                                   with_logits=teacher.has_mlm_head,
                                   dropout=r.distill.student_dropout)  # fmt: skip
                    losses = loss_terms(recipe, t_out, s_out, maps, masks, batch)
                    total = weighted_total(recipe, losses) / tr.grad_accum
                total.backward()
                for k, v in {**losses, "total": total * tr.grad_accum}.items():
                    key = f"loss_{k}"
                    terms[key] = terms.get(key, 0.0) + float(v.detach()) / tr.grad_accum
            torch.nn.utils.clip_grad_norm_([*params.values(), *maps.parameters()], tr.max_grad_norm)

            # 2. importance from this step's gradients, then the optimizer step
            if p.importance != "truncate":
                update_state(importance, {**params, GATES: gates}, p.importance, p.beta1, p.beta2)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            gates.grad = None
            zero_pruned_weights(student, masks)

            # 3. on pruning steps, shrink the masks to the schedule's widths (never grow them)
            if schedule.is_pruning_step(step, p.start_step, p.end_step, p.interval, p.schedule):
                if p.importance == "sensitivity" and p.probe_batches and importance.is_blind():
                    probe_importance(recipe, teacher, student, maps, masks, corpus, step, device,
                                     importance, {**params, GATES: gates})  # fmt: skip
                scores = entry_scores(importance, p.uncertainty)
                if not layers_chosen and target.layers < full.layers:
                    kept = select_layers(scores[GATES].cpu(), target.layers, p.layer_selection)
                    masks = replace(masks, layers=kept.to(device))
                    layers_chosen = True
                widths = schedule.widths_at(
                    step, full, target, p.schedule, p.start_step, p.end_step
                )
                masks = prune_to(
                    masks, rank_structures(p.importance, student, scores, full), widths
                )
                zero_pruned_weights(student, masks)
            if layers_chosen:
                g = schedule.layer_gate(step, p.schedule, p.start_step, p.end_step)
                with torch.no_grad():
                    gates.copy_(torch.where(masks.layers, 1.0, g))

            # 4. metrics, held-out discrepancy, checkpoint
            done = step + 1
            alive = replace(masks, gates=gates.detach()).widths()
            n_params = param_count(alive, teacher.vocab, pooler(student) is not None,
                                   teacher.has_mlm_head)  # fmt: skip
            if done % tr.log_every == 0 or done == tr.steps:
                log.write({"step": done, "lr": lr, **terms, "params": n_params, **alive.to_dict()})
            if done % tr.eval_every == 0 or done == tr.steps:
                ev = evaluate(done, teacher, student, maps, replace(masks, gates=gates.detach()),
                              heldout, teacher_heldout)  # fmt: skip
                log.write(ev)
                bar.set_postfix(loss=f"{terms['loss_total']:.4f}", disc=f"{ev['discrepancy']:.2e}",
                                params=f"{n_params / 1e6:.1f}M")  # fmt: skip
            if done % tr.checkpoint_every == 0 or interrupted() or done == last:
                checkpoint(done)
            if interrupted():
                raise KeyboardInterrupt
    return DistillResult(replace(masks, gates=gates.detach()), maps, last)


def rank_structures(
    kind: str, student: torch.nn.Module, scores: dict[str, torch.Tensor], full: Shape
) -> dict[str, torch.Tensor]:
    """Structure scores for `prune_to`: width truncation (first k), or the EMA'd entry scores
    summed per structure, with magnitude where a kind's sensitivity is still blind."""
    if kind == "truncate":
        return {k: v.to(scores[GATES].device) for k, v in truncation_scores(full).items()}
    params = student_parameters(student)
    return with_magnitude_fallback(
        structure_scores(student, scores, full.head_dim),
        lambda: structure_scores(student, magnitudes(params), full.head_dim),
    )


def probe_importance(
    r: Recipe,
    teacher: Teacher,
    student: torch.nn.Module,
    maps: HiddenMaps,
    masks: Masks,
    corpus: Corpus,
    step: int,
    device: torch.device,
    importance: EmaState,
    tensors: dict[str, torch.Tensor],
) -> None:
    """Seed sensitivity while it is blind. As long as the student equals the teacher every loss
    is at its minimum and its gradient is exactly 0; a few forward/backward passes with dropout in
    the student give |theta * grad| a signal. Nothing is updated but the importance state."""
    p = r.pruning
    for micro_batches in islice(corpus.batches(step), p.probe_batches):
        batch = prepare(micro_batches[0], teacher, r, step, 0).to(device)
        with torch.no_grad():
            t_out = encode(teacher.model, batch.input_ids, batch.attention_mask,
                           with_logits=teacher.has_mlm_head)  # fmt: skip
        s_out = encode(student, batch.input_ids, batch.attention_mask, masks,
                       with_logits=teacher.has_mlm_head, dropout=p.probe_dropout)  # fmt: skip
        weighted_total(r, loss_terms(r, t_out, s_out, maps, masks, batch)).backward()
        update_state(importance, tensors, "sensitivity", p.beta1, p.beta2)
        for t in [*tensors.values(), *maps.parameters()]:
            t.grad = None


def make_optimizer(params: dict, maps: HiddenMaps, r: Recipe) -> torch.optim.Optimizer:
    decay = [p for n, p in params.items() if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in params.items() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    groups = [
        {"params": decay, "weight_decay": r.train.weight_decay},
        {"params": no_decay + list(maps.parameters()), "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=r.train.lr, betas=r.train.adam_betas, eps=r.train.adam_eps)


def prepare(batch: Batch, teacher: Teacher, r: Recipe, step: int, micro: int) -> Batch:
    """Mask tokens for MLM teachers; the mask is a pure function of (seed, step, micro)."""
    if not teacher.has_mlm_head:
        return batch
    g = torch.Generator().manual_seed(r.train.seed * 1_000_003 + step * 101 + micro)
    return mask_tokens(batch, teacher.tokenizer, r.distill.mlm_probability, g)


def loss_terms(
    r: Recipe,
    t: EncoderOutput,
    s: EncoderOutput,
    maps: HiddenMaps,
    masks: Masks,
    batch: Batch,
) -> dict[str, torch.Tensor]:
    """Each loss term, unweighted. Layers being removed are left out of the layer-wise terms."""
    d, att = r.distill, batch.attention_mask
    mapped = [0] + [i + 1 for i in range(masks.layers.numel()) if bool(masks.layers[i])]
    out: dict[str, torch.Tensor] = {}
    if d.hidden > 0:
        out["hidden"] = sum(
            hidden_mse(maps(i, s.hidden_states[i]), t.hidden_states[i], att) for i in mapped
        ) / len(mapped)
    if d.attention > 0:
        layers = mapped[1:]
        out["attention"] = sum(
            attention_kl(t.attentions[i - 1], s.attentions[i - 1], masks.heads[i - 1], att)
            for i in layers
        ) / max(1, len(layers))
    if s.logits is not None and t.logits is not None:
        if d.prediction > 0:
            positions = batch.labels != -100
            out["prediction"] = prediction_kl(t.logits, s.logits, positions, d.temperature)
        if d.mlm > 0:
            out["mlm"] = mlm_cross_entropy(s.logits, batch.labels)
    elif d.prediction > 0:
        last = len(t.hidden_states) - 1
        out["prediction"] = representation_cosine(
            maps(last, s.hidden_states[-1]), t.hidden_states[-1], att
        )
    return out


def weighted_total(r: Recipe, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    weights = {
        "hidden": r.distill.hidden,
        "attention": r.distill.attention,
        "prediction": r.distill.prediction,
        "mlm": r.distill.mlm,
    }
    return sum(weights[k] * v for k, v in losses.items())


@torch.no_grad()
def discrepancy(
    teacher: Teacher,
    student: torch.nn.Module,
    maps: HiddenMaps,
    masks: Masks,
    batch: Batch,
    t_out: EncoderOutput,
) -> tuple[float, str]:
    """Teacher-student discrepancy on a fixed held-out batch: KL of MLM predictions for MLM
    teachers, else 1 - cosine of the mean-pooled sentence embeddings."""
    s_out = encode(student, batch.input_ids, batch.attention_mask, masks,
                   with_logits=teacher.has_mlm_head)  # fmt: skip
    if teacher.has_mlm_head:
        real = batch.attention_mask.bool()
        return float(prediction_kl(t_out.logits, s_out.logits, real, 1.0)), "mlm_kl"
    last = len(t_out.hidden_states) - 1
    mapped = maps(last, s_out.hidden_states[-1])
    return float(representation_cosine(mapped, t_out.hidden_states[-1], batch.attention_mask)), (
        "one_minus_cosine"
    )


def evaluate(step, teacher, student, maps, masks, batch, t_out) -> dict:
    value, kind = discrepancy(teacher, student, maps, masks, batch, t_out)
    return {"step": step, "discrepancy": value, "discrepancy_kind": kind}


@contextmanager
def graceful_interrupt():
    """The first Ctrl-C (or SIGTERM) asks the loop to checkpoint and stop after the current step;
    a second one interrupts at once."""
    hit = {"n": 0}

    def handler(signum, frame):
        hit["n"] += 1
        if hit["n"] > 1:
            raise KeyboardInterrupt
        tqdm.write("interrupt: finishing this step, writing a checkpoint (again to abort now)")

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signals can only be caught on the main thread
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    try:
        yield lambda: hit["n"] > 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
