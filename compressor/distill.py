"""The HomoDistil loop: distill the student from the teacher while pruning it a little at a time.

Reads top to bottom. Step s (0-based): the pruner's event (masks shrink to the schedule's widths,
removed layers fade, a progressive slim cuts), the teacher and student forward and backward on
each micro-batch (train/step.py; the batches were collated and masked on a thread while the step
before trained: prefetch.py), the importance update and optimizer step (train/state.py),
then metrics, the held-out discrepancy and checkpoints. Under torchrun each process takes its
share of a step's micro-batches and DDP averages the gradients (distributed.py); everything after
the backward is the same on every process.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from compressor import distributed
from compressor.bert_params import pooler
from compressor.checkpoint import Checkpoint, CheckpointWriter, load_checkpoint
from compressor.checks import check_finite_losses
from compressor.data import Batch, Corpus
from compressor.errors import Interrupted
from compressor.forward import EncoderOutput, encode, mean_pool
from compressor.losses import HiddenMaps, prediction_kl, representation_cosine
from compressor.metrics import MetricsLog
from compressor.prefetch import Prefetcher
from compressor.prune.masks import Masks
from compressor.prune.progressive import Units
from compressor.prune.schedule import Schedule, lr_at
from compressor.quality import similarity_discrepancy
from compressor.recipe import Recipe
from compressor.shapes import param_count
from compressor.teacher import Teacher
from compressor.train.pruner import Pruner
from compressor.train.state import TrainingState, rng_state, set_rng_state, window_name
from compressor.train.step import micro_step, prepare_share
from compressor.train.throughput import Throughput


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
    r, tr = recipe, recipe.train
    schedule = Schedule.of(r.pruning, teacher.shape, r.target.shape())
    state = TrainingState.start(r, teacher.shape, student, device)
    heldout = corpus.heldout.to(device)
    pruner = Pruner(r, teacher, corpus, schedule, heldout, device)
    start = restore(run_dir, state, pruner, corpus, device)
    state.wrap(teacher.has_mlm_head, device)
    main = distributed.is_main()  # the one process that writes files
    log = MetricsLog(run_dir, resume_step=start, enabled=main)  # step 0: a fresh log
    teacher_heldout = teacher.encode(heldout)
    if start == 0:
        if main:
            log.write(evaluate(0, teacher, student, state.maps, state.masks, heldout,
                               teacher_heldout))  # fmt: skip
        log.write(pruner.measure_noise_floor(state, corpus.step_batches(0, [0])[0]))

    last = min(tr.steps, stop_after) if stop_after is not None else tr.steps
    # this process's share of every step's micro-batches, collated, masked (and pinned for a GPU)
    # on a thread a step ahead of the one training
    micros = distributed.my_micros(tr.grad_accum)
    upcoming = Prefetcher(lambda s: prepare_share(corpus, teacher, r, s, micros,
                                                  pin=device.type == "cuda"),
                          range(start, last), ahead=1, device=device)  # fmt: skip
    bar = tqdm(range(start, last), initial=start, total=tr.steps, desc="distill", unit="step",
               disable=not main)  # fmt: skip
    meter = Throughput(teacher.shape, teacher.vocab.vocab if teacher.has_mlm_head else 0, device)
    unchecked = UncheckedLosses()
    writer = CheckpointWriter()  # checkpoints written while training goes on
    with graceful_interrupt() as interrupted, waiting_for(writer), upcoming:
        for step in bar:
            lr = lr_at(step, tr.lr, tr.warmup_steps, tr.steps)
            state.set_lr(lr)

            # 1. the pruning event: masks shrink, removed layers fade, a progressive slim cuts
            for record in pruner.step(step, state):
                log.write(record)

            # 2. forward and backward each micro-batch of this process's share (none while the
            #    student is still exactly its teacher: its gradient would be rounding noise)
            identity = state.is_teacher_copy()
            terms, shapes = train_micro_batches(r, teacher, state, upcoming.get(step), step,
                                                identity, meter, device)  # fmt: skip
            unchecked.add(step, terms)
            # values are read from the device only where the step logs, evaluates or saves: the
            # losses and gradient norms since the last such step are checked there, first
            done = step + 1
            reads = any(done % n == 0 for n in (tr.log_every, tr.eval_every, tr.checkpoint_every))
            reads = reads or done in (tr.steps, last)
            if reads:
                unchecked.check(step)

            # 3. importance from this step's gradients, the optimizer step, pruned weights re-zeroed
            state.learn(step, update=not identity, rank=schedule.events_in(step + 1, tr.steps),
                        check=reads)  # fmt: skip

            # 4. metrics, held-out discrepancy, checkpoint
            widths = state.widths()
            meter.add_flops(shapes, state.masks.tensor_shape())  # what the hardware computes
            n_params = param_count(widths, teacher.vocab, pooler(state.student) is not None,
                                   teacher.has_mlm_head)  # fmt: skip
            if done % tr.log_every == 0 or done == tr.steps:
                # each process holds its share of losses and tokens
                terms = meter.window(read_values(terms))
                extra = {"identity_step": True} if identity else {}
                if meter.mfu is not None:  # on a CUDA device of known peak
                    extra["mfu"] = round(meter.mfu, 4)
                log.write({"step": done, "lr": lr, **terms, **extra, "params": n_params,
                           "tokens_per_s": round(meter.rate, 1), **widths.to_dict()})  # fmt: skip
            if main and (done % tr.eval_every == 0 or done == tr.steps):
                ev = evaluate(done, teacher, state.student, state.maps, state.final_masks(),
                              heldout, teacher_heldout)  # fmt: skip
                log.write(ev)
                shown = {"mfu": f"{meter.mfu:.1%}"} if meter.mfu is not None else {}
                bar.set_postfix(loss=f"{float(terms['loss_total']):.4f}",
                                disc=f"{ev['discrepancy']:.2e}", params=f"{n_params / 1e6:.1f}M",
                                tok_s=f"{meter.rate:.0f}", **shown)  # fmt: skip
            stop = distributed.any_rank(interrupted())  # a signal to one process stops them all
            if done % tr.checkpoint_every == 0 or stop or done == last:
                unchecked.check(step)  # an interrupt may save a step that reads nothing else
                state.check_norms(step)
                events_left = schedule.events_in(done, tr.steps)
                write_checkpoint(run_dir, done, state, pruner, corpus, events_left, device,
                                 writer)  # fmt: skip
            if stop:
                writer.wait()  # on disk before the process says so
                raise Interrupted(run_dir, True, stop, distributed.world_size())
    state.check_identical_over_ranks()
    return DistillResult(state.final_masks(), state.maps, last, state.units)


def train_micro_batches(
    r: Recipe,
    teacher: Teacher,
    state: TrainingState,
    share: list[tuple[int, Batch]],
    step: int,
    identity: bool,
    meter: Throughput,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor | float], list[tuple[int, int, int]]]:
    """Forward teacher and student on each micro-batch of this process's share of the step
    (prepared: collated and masked, each with its index; all of them in one process; none when
    `identity`), backward the weighted loss; DDP averages the gradients on the last one. Returns
    the mean loss terms over the step's micro-batches (on the device, in float64: summed as the
    host summed them, read by `read_values`) and the (sequences, length, MLM head positions) of
    each, for the FLOPs (Throughput)."""
    bf16 = r.train.precision == "bf16"
    share = [] if identity else share
    terms: dict[str, torch.Tensor | float] = {"loss_total": 0.0}
    shapes = []
    for n, (_, batch) in enumerate(share):
        shapes.append(meter.add(batch))
        with distributed.syncing(state.model, sync=n == len(share) - 1):
            values = micro_step(r.distill, teacher, state.model, state.masks,
                                batch.to(device, non_blocking=True), step,
                                r.distill.student_dropout, bf16, len(share),
                                check=False)  # fmt: skip
        for k, v in values.items():
            terms[f"loss_{k}"] = terms.get(f"loss_{k}", 0.0) + v.double() / r.train.grad_accum
    return terms, shapes


def read_values(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Device values as floats, in one read."""
    on_device = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    read = torch.stack([values[k] for k in on_device]).tolist() if on_device else []
    return {**values, **dict(zip(on_device, read, strict=True))}


class UncheckedLosses:
    """The loss terms of the steps since the last check, summed on the device (a non-finite one
    keeps the sum non-finite): checked where the loop reads values anyway, before anything is
    logged or saved."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.first: int | None = None

    def add(self, step: int, terms: dict[str, torch.Tensor | float]) -> None:
        for k, v in terms.items():
            if isinstance(v, torch.Tensor):
                self.sums[k] = self.sums[k] + v if k in self.sums else v
                self.first = step if self.first is None else self.first

    def check(self, step: int) -> None:
        if not self.sums:
            return
        values, first = read_values(self.sums), self.first
        self.sums, self.first = {}, None
        check_finite_losses(step, {window_name(k.removeprefix("loss_"), first, step): v
                                   for k, v in values.items()})  # fmt: skip


def write_checkpoint(
    run_dir: Path,
    next_step: int,
    state: TrainingState,
    pruner: Pruner,
    corpus: Corpus,
    events_left: bool,
    device: torch.device,
    writer: CheckpointWriter,
) -> None:
    """Rank 0 writes (with every rank's random generators; on `writer`'s thread, once the last
    write is done); the others wait until it has taken its copy. The importance EMA is stored
    only while pruning events are left to read it."""
    rngs = distributed.gather(rng_state(device))
    if distributed.is_main():
        writer.save(run_dir, Checkpoint(
            step=next_step, **state.stored(events_left), **pruner.stored(),
            torch_rng=rngs[0]["cpu"], rank_rng=rngs, world_size=distributed.world_size(),
            data=corpus.position(next_step),
        ))  # fmt: skip
    distributed.barrier()


def restore(
    run_dir: Path, state: TrainingState, pruner: Pruner, corpus: Corpus, device: torch.device
) -> int:
    """Continue from the run's last good checkpoint, if any: the training state, the pruner's
    decisions, the data stream's position and this process's random generators. Returns the next
    step (0 without a checkpoint)."""
    ckpt = load_checkpoint(run_dir, warn=tqdm.write)
    if ckpt is None:
        return 0
    state.restore(ckpt, device)
    pruner.restore(ckpt.layers_chosen, ckpt.noise_floor)
    corpus.restore(ckpt.step, ckpt.data)
    rngs = ckpt.rank_rng or [{"cpu": ckpt.torch_rng}]
    set_rng_state(rngs[distributed.rank()], device)
    return int(ckpt.step)


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
def waiting_for(writer: CheckpointWriter):
    """The checkpoint in flight is on disk when training ends; its error raised unless another
    one is on its way."""
    try:
        yield
    except BaseException:
        writer.wait(raise_error=False)
        raise
    writer.wait()


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
