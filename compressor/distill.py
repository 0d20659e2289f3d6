"""The HomoDistil loop: distill the student from the teacher while pruning it a little at a time.

Reads top to bottom. Every mask change is a visible line; there are no hooks. Step s (0-based):
teacher forward, student forward under the masks, loss, backward, importance update, optimizer
step, re-zero pruned weights, and, on pruning steps, shrink the masks to the schedule's widths
(with `pruning.progressive_slim`, then cut what they pruned out of the student and its state).
Under torchrun each process takes its share of a step's micro-batches and DDP averages the
gradients (distributed.py); everything after the backward is the same on every process.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import torch
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from compressor import distributed
from compressor.bert_params import pooler, student_parameters
from compressor.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from compressor.checks import check_finite_losses, check_progressive_slim
from compressor.data import Batch, Corpus, mask_tokens
from compressor.errors import CheckFailed, Interrupted, RecipeError
from compressor.flops import mfu, peak_bf16_flops, step_flops
from compressor.forward import EncoderOutput, encode, mean_pool
from compressor.losses import (
    HiddenMaps,
    StudentLoss,
    prediction_kl,
    representation_cosine,
    weighted_total,
)
from compressor.metrics import MetricsLog
from compressor.prune import schedule
from compressor.prune.importance import (
    EmaState,
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
from compressor.prune.progressive import (
    Units,
    cut_importance,
    cut_maps_inputs,
    cut_masks,
    cut_named,
    cut_student,
    cut_tensor,
    renamed,
    tensor_cuts,
)
from compressor.quality import similarity_discrepancy
from compressor.recipe import DistillSpec, Recipe
from compressor.shapes import Shape, param_count
from compressor.teacher import Teacher
from compressor.train_state import (
    MOMENTS,
    optimizer_names,
    pack_importance,
    pack_optimizer,
    pack_student,
    pruned_entries,
    rng_state,
    set_rng_state,
    snapshot,
    unpack_importance,
    unpack_optimizer,
    unpack_student,
)

FADE = "__layer_fade__"


@dataclass
class DistillResult:
    masks: Masks  # over the student's current units
    maps: HiddenMaps
    steps_done: int
    units: Units | None = None  # the teacher's indices of those units, once progressively slimmed


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
    full, target = teacher.shape, recipe.target.shape()
    params = student_parameters(student)
    maps = HiddenMaps(full.layers + 1, full.hidden).to(device)
    optimizer = make_optimizer(params, maps, recipe)
    masks = Masks.full(full, device)
    fade = torch.nn.Parameter(masks.fade.clone())  # dL/dfade ranks the layers
    importance = EmaState.zeros_like({**params, FADE: fade})
    layers_chosen, start, floor = False, 0, None
    initial, names = snapshot(student), optimizer_names(optimizer, params)
    units: Units | None = None  # the teacher's indices of the student's units, once slimmed
    if p.progressive_slim and distributed.world_size() > 1:
        raise RecipeError(recipe.name, [
            f"pruning.progressive_slim: not supported under torchrun (world size"
            f" {distributed.world_size()}): DDP wraps the student at its first shape; set it to"
            " false, or train in one process"
        ])  # fmt: skip

    ckpt = load_checkpoint(run_dir, warn=tqdm.write)
    if ckpt is not None and ckpt.units is not None:  # cut as it was before its state loads
        units = Units.from_dict(ckpt.units)
        state = cut_training_state(units, recipe, student, maps, optimizer, importance,
                                   Masks.full(full, device), initial)  # fmt: skip
        optimizer, importance, masks, fade, initial = state
        params = student_parameters(student)
        names = optimizer_names(optimizer, params)
    if ckpt is not None:
        masks = Masks.from_dict(ckpt.masks, device)
        pruned = pruned_entries(student, masks)
        student.load_state_dict(unpack_student(ckpt.student, initial, pruned))
        maps.load_state_dict(ckpt.maps)
        optimizer.load_state_dict(unpack_optimizer(ckpt.optimizer))  # moves it to the params
        with torch.no_grad():
            fade.copy_(masks.fade)
        importance = unpack_importance(ckpt.importance, importance, device)
        layers_chosen, start = bool(ckpt.layers_chosen), int(ckpt.step)
        floor = ckpt.noise_floor
        rngs = ckpt.rank_rng or [{"cpu": ckpt.torch_rng}]
        corpus.restore(start, ckpt.data)
        set_rng_state(rngs[distributed.rank()], device)
        check_on_device(device, student, maps, optimizer, importance, masks)
    # what learns or is ranked from a gradient, as one module: under torchrun DDP all-reduces
    # its gradients (the teacher is not wrapped)
    model = distributed.wrap(StudentLoss(student, maps, fade, teacher.has_mlm_head), device)
    model.units = units
    main = distributed.is_main()  # the one process that writes files
    log = MetricsLog(run_dir, resume_step=start, enabled=main)  # step 0: a fresh log
    heldout = corpus.heldout.to(device)
    with torch.no_grad():
        teacher_heldout = encode(teacher.model, heldout.input_ids, heldout.attention_mask,
                                 with_logits=teacher.has_mlm_head)  # fmt: skip
    if start == 0:
        if main:
            log.write(evaluate(0, teacher, student, maps, masks, heldout, teacher_heldout))
        first = next(corpus.batches(0))[0]
        floor = noise_floors(r, teacher, student, model, replace(masks, fade=fade), first, device,
                             {**params, FADE: fade})  # fmt: skip
        log.write({"step": 0, "event": "noise_floor", "floor": floor})

    def checkpoint(next_step: int) -> None:
        """Rank 0 writes (with every rank's random generators); the others wait."""
        rngs = distributed.gather(rng_state(device))
        if main:
            pruned = pruned_entries(student, masks)
            save_checkpoint(run_dir, TrainingState(
                step=next_step, student=pack_student(student, initial, pruned),
                maps=maps.state_dict(), optimizer=pack_optimizer(optimizer, names, pruned),
                masks=replace(masks, fade=fade.detach()).to_dict(),
                importance=pack_importance(importance, recipe, next_step),
                layers_chosen=layers_chosen, noise_floor=floor, torch_rng=rngs[0]["cpu"],
                world_size=distributed.world_size(), rank_rng=rngs,
                data=corpus.position(next_step),
                units=units.to_dict() if units is not None else None,
            ))  # fmt: skip
        distributed.barrier()

    batches = corpus.batches(start)
    bf16 = tr.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    last = min(tr.steps, stop_after) if stop_after is not None else tr.steps
    bar = tqdm(range(start, last), initial=start, total=tr.steps, desc="distill", unit="step",
               disable=not main)  # fmt: skip
    tokens, since, rate = 0, time.perf_counter(), 0.0  # throughput since the last log record
    flops, use = 0, None  # model FLOPs since the last log record; MFU on a CUDA device we know
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    mlm_vocab = teacher.vocab.vocab if teacher.has_mlm_head else 0
    with graceful_interrupt() as interrupted:
        for step in bar:
            lr = schedule.lr_at(step, tr.lr, tr.warmup_steps, tr.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 1. on pruning steps, shrink the masks to the schedule's widths (never grow them),
            #    from scores shown to be above the noise floor; then fade the removed layers
            masks = replace(masks, fade=fade)
            if schedule.is_pruning_step(step, p.start_step, p.end_step, p.interval, p.schedule):
                source, scores, margins = pruning_signal(
                    recipe, teacher, student, model, masks, corpus, step, device, importance,
                    {**params, FADE: fade}, floor,
                )  # fmt: skip
                event = {"step": step, "event": "prune", "signal": source, "margins": margins}
                if not layers_chosen and target.layers < full.layers:
                    kept, why = choose_layers(recipe, teacher, student, masks, corpus, step,
                                              device, scores[FADE])  # fmt: skip
                    masks = replace(masks, layers=kept.to(device))
                    layers_chosen = True
                    event |= {"layers_kept": kept.nonzero().flatten().tolist(), **why}
                widths = schedule.widths_at(
                    step, full, target, p.schedule, p.start_step, p.end_step
                )
                ranked = rank_structures(
                    p.importance, student, scores, masks.tensor_shape(), masks.layers
                )
                masks = prune_to(masks, ranked, widths)
                distributed.check_identical(masks.to_dict(), f"the masks pruned at step {step}")
                zero_pruned_weights(student, masks)
                log.write({**event, **widths.to_dict()})
            if layers_chosen:
                f = schedule.layer_fade(step, p.schedule, p.start_step, p.end_step)
                with torch.no_grad():
                    fade.copy_(torch.where(masks.layers, 1.0, f))

            # 1b. progressive slim: cut what the masks pruned (and the layers faded to 0) out of
            #     the student and its state, then check that it computes what it did masked
            pruning_step = schedule.is_pruning_step(
                step, p.start_step, p.end_step, p.interval, p.schedule
            )
            cut = Units.kept(masks) if p.progressive_slim and pruning_step else None
            if cut is not None and not cut.is_identity_of(masks.tensor_shape()):
                with torch.no_grad():
                    before = encode(student, heldout.input_ids, heldout.attention_mask, masks)
                state = cut_training_state(cut, recipe, student, maps, optimizer, importance,
                                           masks, initial)  # fmt: skip
                optimizer, importance, masks, fade, initial = state
                params = student_parameters(student)
                names = optimizer_names(optimizer, params)
                units = (units or Units.identity(full)).then(cut)
                model.units, model.fade = units, fade
                with torch.no_grad():
                    after = encode(student, heldout.input_ids, heldout.attention_mask, masks)
                diff = check_progressive_slim(before, after, cut.hidden, heldout.attention_mask,
                                              step)  # fmt: skip
                log.write({"step": step, "event": "slim", "masked_vs_slim_max_abs": diff,
                           **masks.tensor_shape().to_dict()})  # fmt: skip

            # 2. forward teacher and student on each micro-batch of this process's share (all of
            #    them in one process), backward the weighted loss; gradients are averaged over the
            #    processes on the last one. A student that is still exactly the teacher has nothing
            #    to learn (its gradient is rounding noise), so that step moves nothing
            terms: dict[str, float] = {"loss_total": 0.0}
            step_batches = next(batches)
            # a slimmed student's masks are all alive, but it is no longer its teacher
            identity = units is None and is_teacher_copy(recipe, masks, optimizer)
            share = [] if identity else distributed.my_share(step_batches)
            shapes = []  # (sequences, length) of each micro-batch, for the model FLOPs
            for n, (micro, batch) in enumerate(share):
                batch = prepare(batch, teacher, recipe, step, micro)
                tokens += int(batch.attention_mask.sum())  # real tokens, counted on the host
                shapes.append(tuple(batch.input_ids.shape))
                batch = batch.to(device)
                with torch.no_grad(), autocast:
                    t_out = encode(teacher.model, batch.input_ids, batch.attention_mask,
                                   with_logits=teacher.has_mlm_head)  # fmt: skip
                with distributed.syncing(model, sync=n == len(share) - 1):
                    losses = model(r.distill, t_out, masks, batch, r.distill.student_dropout, bf16)
                    total = weighted_total(r.distill, losses)
                    values = {k: float(v.detach()) for k, v in losses.items()}
                    check_finite_losses(step, values)  # before anything learns from it
                    (total / len(share)).backward()  # DDP then averages over the processes
                for k, v in {**values, "total": float(total.detach())}.items():
                    terms[f"loss_{k}"] = terms.get(f"loss_{k}", 0.0) + v / tr.grad_accum

            # 3. importance from this step's gradients (dL/dtheta, before clipping), then the
            #    optimizer step
            if not identity:
                if p.importance != "truncate":
                    tensors = {**params, FADE: fade}
                    update_state(importance, tensors, p.importance, p.beta1, p.beta2)
                norm = clip_grad_norm_([*params.values(), *maps.parameters()], tr.max_grad_norm)
                check_finite_losses(step, {"gradient norm": float(norm)})
                optimizer.step()
            model.zero_grad(set_to_none=True)
            zero_pruned_weights(student, masks)

            # 4. metrics, held-out discrepancy, checkpoint
            done = step + 1
            alive = replace(masks, fade=fade.detach()).widths()  # the widths of this step
            flops += sum(n * step_flops(full, alive, t, mlm_vocab) for n, t in shapes)
            n_params = param_count(alive, teacher.vocab, pooler(student) is not None,
                                   teacher.has_mlm_head)  # fmt: skip
            if done % tr.log_every == 0 or done == tr.steps:
                # each process holds its share of the mean losses and of the tokens
                terms = distributed.sum_over_ranks({**terms, "tokens": tokens, "flops": flops})
                seconds = time.perf_counter() - since  # wall clock
                rate, done_flops = terms.pop("tokens") / seconds, terms.pop("flops")
                use = mfu(done_flops, seconds, peak, distributed.world_size()) if peak else None
                tokens, flops, since = 0, 0, time.perf_counter()
                extra = {"identity_step": True} if identity else {}
                if use is not None:  # on a CUDA device of known peak
                    extra["mfu"] = round(use, 4)
                log.write({"step": done, "lr": lr, **terms, **extra, "params": n_params,
                           "tokens_per_s": round(rate, 1), **alive.to_dict()})  # fmt: skip
            if main and (done % tr.eval_every == 0 or done == tr.steps):
                ev = evaluate(done, teacher, student, maps, replace(masks, fade=fade.detach()),
                              heldout, teacher_heldout)  # fmt: skip
                log.write(ev)
                shown = {"mfu": f"{use:.1%}"} if use is not None else {}
                bar.set_postfix(loss=f"{terms['loss_total']:.4f}", disc=f"{ev['discrepancy']:.2e}",
                                params=f"{n_params / 1e6:.1f}M", tok_s=f"{rate:.0f}",
                                **shown)  # fmt: skip
            stop = distributed.any_rank(interrupted())  # a signal to one process stops them all
            if done % tr.checkpoint_every == 0 or stop or done == last:
                checkpoint(done)
            if stop:
                raise Interrupted(run_dir, True, stop, distributed.world_size())
    weights = {**student.state_dict(), **{f"maps.{k}": v for k, v in maps.state_dict().items()}}
    distributed.check_identical(weights, "the student's weights and maps at the end of training")
    return DistillResult(replace(masks, fade=fade.detach()), maps, last, units)


def cut_training_state(
    cut: Units,
    r: Recipe,
    student: torch.nn.Module,
    maps: HiddenMaps,
    optimizer: torch.optim.Optimizer,
    importance: EmaState,
    masks: Masks,
    initial: dict[str, torch.Tensor],
) -> tuple[torch.optim.Optimizer, EmaState, Masks, torch.nn.Parameter, dict[str, torch.Tensor]]:
    """Cut the kept units of everything that holds the student's units (progressive.py): the
    student and the maps' inputs in place; returned, the optimizer (AdamW's moments cut alike),
    the importance state, the masks over the kept units, a new fade parameter, and the base the
    checkpoints store the student against."""
    head_dim = masks.qk.shape[2]
    cuts = tensor_cuts(student, cut, head_dim)
    new_importance = cut_importance(importance, student, cut, head_dim, masks.layers, FADE)
    old = {**{f"student.{n}": t for n, t in student_parameters(student).items()},
           **{f"maps.{n}": t for n, t in maps.named_parameters()}}  # fmt: skip
    moments = {n: optimizer.state[t] for n, t in old.items() if t in optimizer.state}
    lrs = [g["lr"] for g in optimizer.param_groups]
    base = cut_named(initial, cuts, cut)
    cut_student(student, cut, head_dim)
    cut_maps_inputs(maps, cut.hidden)
    new_optimizer = make_optimizer(student_parameters(student), maps, r)
    for g, lr in zip(new_optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    new = {**{f"student.{n}": t for n, t in student_parameters(student).items()},
           **{f"maps.{n}": t for n, t in maps.named_parameters()}}  # fmt: skip
    for n, st in moments.items():
        kind, _, rest = n.partition(".")
        name = renamed(rest, cut) if kind == "student" else rest
        if name is None:
            continue  # a dropped layer's
        index = cuts[rest] if kind == "student" else (None, cut.hidden)
        new_optimizer.state[new[f"{kind}.{name}"]] = {
            k: cut_tensor(v, index) if k in MOMENTS else v for k, v in st.items()
        }
    new_masks = cut_masks(replace(masks, fade=masks.fade.detach()), cut)
    fade = torch.nn.Parameter(new_masks.fade.clone())
    return new_optimizer, new_importance, replace(new_masks, fade=fade), fade, base


def is_teacher_copy(r: Recipe, masks: Masks, optimizer: torch.optim.Optimizer) -> bool:
    """True while the student is still exactly its teacher and every loss term is at its minimum:
    initialised as a copy, trained without dropout or an MLM loss, nothing pruned or faded, and no
    optimizer step taken yet."""
    return (
        r.student.init == "teacher"
        and r.distill.student_dropout == 0
        and r.distill.mlm == 0  # the MLM loss is not at its minimum at the teacher
        and not optimizer.state
        and all(bool(getattr(masks, k).all()) for k in ("hidden", "heads", "qk", "vo", "ffn"))
        and bool((masks.fade == 1).all())
    )


def choose_layers(
    r: Recipe,
    teacher: Teacher,
    student: torch.nn.Module,
    masks: Masks,
    corpus: Corpus,
    step: int,
    device: torch.device,
    fade_scores: torch.Tensor,
) -> tuple[torch.Tensor, dict]:
    """The layers that stay (irreversible), and what decided it, for the metrics log."""
    p, keep = r.pruning, r.target.layers
    if p.layer_selection != "removal":
        return select_layers(fade_scores.cpu(), keep, p.layer_selection), {}
    batches = [
        prepare(b[0], teacher, r, step, 0).to(device)
        for b in islice(corpus.batches(step), max(1, p.probe_batches))
    ]
    with torch.no_grad():
        targets = [
            encode(teacher.model, b.input_ids, b.attention_mask, with_logits=teacher.has_mlm_head)
            for b in batches
        ]

    def cost(kept: torch.Tensor) -> float:
        """Discrepancy of the final output with the other layers faded out (forward only);
        rank 0's, so that every process takes the same decision."""
        trial = replace(masks, layers=kept.to(device), fade=kept.to(masks.fade))
        with torch.no_grad():
            value = sum(
                output_discrepancy(teacher, student, trial, b, t)
                for b, t in zip(batches, targets, strict=True)
            ) / len(batches)
        return distributed.from_main(value)

    kept, rounds = greedy_layer_removal(masks.layers.numel(), keep, cost)
    return kept, {"layer_removal_costs": rounds}


def output_discrepancy(
    teacher: Teacher, student: torch.nn.Module, masks: Masks, batch: Batch, t: EncoderOutput
) -> float:
    """Map-free discrepancy of the final output at the teacher's width: KL of MLM predictions,
    or 1 - cosine of the mean-pooled sentence embeddings."""
    s = encode(student, batch.input_ids, batch.attention_mask, masks,
               with_logits=teacher.has_mlm_head)  # fmt: skip
    if teacher.has_mlm_head:
        return float(prediction_kl(t.logits, s.logits, batch.attention_mask.bool(), 1.0))
    return float(representation_cosine(s.hidden_states[-1], t.hidden_states[-1],
                                       batch.attention_mask))  # fmt: skip


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


def pruning_signal(
    r: Recipe,
    teacher: Teacher,
    student: torch.nn.Module,
    model: torch.nn.Module,
    masks: Masks,
    corpus: Corpus,
    step: int,
    device: torch.device,
    importance: EmaState,
    tensors: dict[str, torch.Tensor],
    floor: dict[str, dict[str, float]] | None,
) -> tuple[str, dict[str, torch.Tensor], dict[str, float]]:
    """The scores a pruning event decides from, which signal they are and their margin over the
    noise floor per structure kind.

    Sensitivity comes from the importance EMA once it has `pruning.min_history` updates and
    clears the margin; otherwise probe batches are added to it (dropout batches; nothing but the
    importance state is updated), after resetting it if what it held did not clear the margin. A probe that does not clear the margin is an error: no decision is ever
    taken from rounding noise. `magnitude` and `truncate` need no gradient and no floor.
    """
    p = r.pruning
    if p.importance == "truncate":
        return "truncate", dict(importance.i_bar), {}
    if p.importance == "magnitude":
        return "magnitude", magnitudes(tensors), {}
    source = "ema"
    floors = floor or {"ema": None, "probe": None}
    margins = importance_margins(student, importance, floors["ema"], masks, p.beta1, teacher.shape)
    clear = min(margins.values()) >= p.min_signal_margin
    if importance.steps < p.min_history or not clear:
        source = "probe"
        if not clear:
            importance.reset()  # what it holds is not signal: start afresh
        probe_importance(r, teacher, model, masks, corpus, step, device, importance, tensors)
        margins = importance_margins(
            student, importance, floors["probe"], masks, p.beta1, teacher.shape
        )
        weak = {k: v for k, v in margins.items() if not v >= p.min_signal_margin}
        if weak:
            shown = ", ".join(f"{k} {v:.3g}" for k, v in weak.items())
            raise CheckFailed(
                f"pruning at step {step}: the probe's importance is not above the noise floor"
                f" (margin {shown}; needed {p.min_signal_margin}). Raise pruning.probe_batches or"
                " pruning.probe_dropout; no decision is taken from rounding noise"
            )
    # a short probe has no history for PLATON's uncertainty term: rank by its mean importance
    if source == "ema":
        return source, entry_scores(importance, p.uncertainty), margins
    return source, importance.mean_importance(p.beta1), margins


def importance_margins(
    student: torch.nn.Module,
    importance: EmaState,
    floor: dict[str, float] | None,
    masks: Masks,
    b1: float,
    full: Shape,
) -> dict[str, float]:
    """Per structure kind (and the layer fades), the margin of the mean importance seen so far
    over the noise floor. Without a floor (a student that never equalled its teacher) every margin
    is infinite: its gradients are real."""
    mean = importance.mean_importance(b1)
    kinds = {**structure_scores(student, mean, full.head_dim, masks.layers), "layers": mean[FADE]}
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


def noise_floors(
    r: Recipe,
    teacher: Teacher,
    student: torch.nn.Module,
    model: torch.nn.Module,
    masks: Masks,
    batch: Batch,
    device: torch.device,
    tensors: dict[str, torch.Tensor],
) -> dict[str, dict[str, float]] | None:
    """The floors the EMA's scores (training precision) and the probe's scores (always fp32) are
    held to. None when the student does not start as its teacher (its gradients are real)."""
    if r.student.init != "teacher" or r.pruning.importance != "sensitivity":
        return None
    fp32 = measure_noise_floor(r, teacher, student, model, masks, batch, device, tensors, False)
    if r.train.precision == "fp32":
        return {"ema": fp32, "probe": fp32}
    low = measure_noise_floor(r, teacher, student, model, masks, batch, device, tensors, True)
    return {"ema": low, "probe": fp32}


def measure_noise_floor(
    r: Recipe,
    teacher: Teacher,
    student: torch.nn.Module,
    model: torch.nn.Module,
    masks: Masks,
    batch: Batch,
    device: torch.device,
    tensors: dict[str, torch.Tensor],
    bf16: bool,
) -> dict[str, float]:
    """The importance that rounding noise alone produces: one backward pass of the student while
    it still equals the teacher (no dropout), in fp32 or under bf16 autocast. Every process
    measures the same batch (through DDP: the same averaged gradients)."""
    batch = prepare(batch, teacher, r, -1, 0).to(device)
    # the distillation terms only: they sit at their minimum at the teacher, the MLM loss does
    # not (its gradient there is real, not noise)
    backward_distill_loss(r.distill.model_copy(update={"mlm": 0.0}), teacher, model, masks, batch,
                          bf16=bf16)  # fmt: skip
    noise = {n: instant_importance(t, t.grad, "sensitivity") for n, t in tensors.items()}
    model.zero_grad(set_to_none=True)
    kinds = {**structure_scores(student, noise, teacher.shape.head_dim), "layers": noise[FADE]}
    return noise_floor(kinds)


def probe_importance(
    r: Recipe,
    teacher: Teacher,
    model: torch.nn.Module,
    masks: Masks,
    corpus: Corpus,
    step: int,
    device: torch.device,
    importance: EmaState,
    tensors: dict[str, torch.Tensor],
) -> None:
    """Fresh sensitivity when the EMA has too little history (above all while the student still
    equals the teacher, where every loss gradient is rounding noise): a few forward/backward
    passes with dropout in the student give |theta * grad| a real signal. Always in fp32, so the
    decisions it feeds do not depend on the training precision. Nothing is updated but the
    importance state. Every process probes the same batches with rank 0's dropout masks, so the
    averaged gradients equal a single process's."""
    p = r.pruning
    set_rng_state(distributed.from_main(rng_state(device)), device)
    for micro_batches in islice(corpus.batches(step), p.probe_batches):
        batch = prepare(micro_batches[0], teacher, r, step, 0).to(device)
        backward_distill_loss(r.distill, teacher, model, masks, batch, p.probe_dropout)
        update_state(importance, tensors, "sensitivity", p.beta1, p.beta2)
        model.zero_grad(set_to_none=True)


def backward_distill_loss(
    d: DistillSpec,
    teacher: Teacher,
    model: torch.nn.Module,
    masks: Masks,
    batch: Batch,
    dropout: float = 0.0,
    bf16: bool = False,
) -> None:
    """One forward/backward of the weighted distillation loss on one batch (no optimizer step):
    what the noise floor and the probe measure importance from. `model` is the loop's
    StudentLoss (under DDP: every backward goes through DDP's forward)."""
    autocast = torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast:
        t_out = encode(teacher.model, batch.input_ids, batch.attention_mask,
                       with_logits=teacher.has_mlm_head)  # fmt: skip
    weighted_total(d, model(d, t_out, masks, batch, dropout, bf16)).backward()


def check_on_device(
    device: torch.device,
    student: torch.nn.Module,
    maps: HiddenMaps,
    optimizer: torch.optim.Optimizer,
    importance: EmaState,
    masks: Masks,
) -> None:
    """CheckFailed naming every piece of the training state that is not on `device` (a resumed
    checkpoint is loaded to the CPU first)."""
    pieces = {
        **{f"student.{n}": t for n, t in student.state_dict().items()},
        **{f"maps.{n}": t for n, t in maps.state_dict().items()},
        **{f"importance.i_bar.{n}": t for n, t in importance.i_bar.items()},
        **{f"importance.u_bar.{n}": t for n, t in importance.u_bar.items()},
        **{f"masks.{n}": t for n, t in masks.__dict__.items()},
        **{
            f"optimizer.state[{i}].{k}": v
            for i, st in enumerate(optimizer.state.values())
            for k, v in st.items()
            if isinstance(v, torch.Tensor) and v.ndim > 0  # AdamW keeps `step` on the CPU
        },
    }
    elsewhere = [n for n, t in pieces.items() if t.device.type != device.type]
    if elsewhere:
        raise CheckFailed(
            f"after the resume, {len(elsewhere)} tensors of the training state are not on"
            f" {device}: {', '.join(elsewhere[:5])}"
        )


def make_optimizer(params: dict, maps: HiddenMaps, r: Recipe) -> torch.optim.Optimizer:
    """AdamW over the student and the maps. Frozen word embeddings still get gradients (importance
    scores hidden dims from them) but are not stepped."""
    if r.train.freeze_word_embeddings:
        params = {n: p for n, p in params.items() if not n.endswith("word_embeddings.weight")}
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


@torch.no_grad()
def evaluate(
    step: int,
    teacher: Teacher,
    student: torch.nn.Module,
    maps: HiddenMaps,
    masks: Masks,
    batch: Batch,
    t_out: EncoderOutput,
) -> dict:
    """Teacher-student discrepancy on the fixed held-out batch, measured on what ships: KL of MLM
    predictions for MLM teachers; for head-less encoders 1 - Spearman of the pairwise cosine
    similarities of the sentence embeddings (quality.py; no learned map, widths may differ). The
    map-based 1 - cosine is logged beside it as a training signal."""
    s_out = encode(student, batch.input_ids, batch.attention_mask, masks,
                   with_logits=teacher.has_mlm_head)  # fmt: skip
    att = batch.attention_mask
    if teacher.has_mlm_head:
        value = float(prediction_kl(t_out.logits, s_out.logits, att.bool(), 1.0))
        return {"step": step, "discrepancy": value, "discrepancy_kind": "mlm_kl"}
    last = len(t_out.hidden_states) - 1
    mapped = maps(last, s_out.hidden_states[-1])
    return {
        "step": step,
        "discrepancy": similarity_discrepancy(
            mean_pool(s_out.hidden_states[-1], att), mean_pool(t_out.hidden_states[-1], att)
        ),
        "discrepancy_kind": "one_minus_similarity_spearman",
        "mapped_one_minus_cosine": float(
            representation_cosine(mapped, t_out.hidden_states[-1], att)
        ),
    }


@contextmanager
def graceful_interrupt():
    """The first Ctrl-C (or SIGTERM) asks the loop to checkpoint and stop after the current step;
    a second one interrupts at once. Yields a function: the signal received (0: none yet)."""
    hit = {"n": 0, "signum": 0}

    def handler(signum, frame):
        hit["n"] += 1
        hit["signum"] = hit["signum"] or signum
        if hit["n"] > 1:
            raise KeyboardInterrupt(signum)
        tqdm.write("interrupt: finishing this step, writing a checkpoint (again to abort now)")

    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0  # signals can only be caught on the main thread
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    try:
        yield lambda: hit["signum"]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
