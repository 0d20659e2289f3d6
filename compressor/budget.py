"""A recipe's training budget (`compress recipe check`): tokens and model FLOPs over the
schedule's width curve (flops.py). Pure: no weights, no deep-learning stack."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.flops import budget_flops
from compressor.prune.schedule import Schedule
from compressor.recipe import Recipe
from compressor.shapes import Shape


@dataclass(frozen=True)
class Budget:
    steps: int
    sequences: int  # per step, over all processes: batch_size x grad_accum
    seq: int  # tokens per sequence (data.max_length)
    flops: int  # model FLOPs of the whole run, the student at the schedule's widths

    @property
    def tokens(self) -> int:
        """Token positions trained on (padding included where a batch is padded)."""
        return self.steps * self.sequences * self.seq


def recipe_budget(r: Recipe, full: Shape, mlm_vocab: int) -> Budget:
    """The budget of recipe `r` for a teacher of shape `full` (with an MLM head over `mlm_vocab`
    tokens, or 0): every step at the widths the schedule holds during it."""
    t = r.train
    runs = Schedule.of(r.pruning, full, r.target.shape()).width_runs(t.steps)
    sequences = t.batch_size * t.grad_accum
    flops = budget_flops(full, runs, sequences, r.data.max_length, mlm_vocab)
    return Budget(r.train.steps, sequences, r.data.max_length, flops)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
