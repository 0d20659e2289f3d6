"""The pruning schedule: one object built once from the recipe, and the pure curve it follows.

`remaining(t)` is the fraction of the way from the target back to the full width: 1 before
`start`, 0 from `end` on. Widths interpolate between teacher and target with it, so every
structure kind shrinks by the same fraction at the same time (the paper's uniform allocation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor.shapes import Shape

KINDS = ("cubic", "linear", "one_shot")


def remaining(step: int, kind: str, start: int, end: int) -> float:
    """Fraction of the prunable excess still present after the pruning event at `step`."""
    if kind == "one_shot":
        return 1.0 if step < start else 0.0
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    progress = (step - start) / (end - start)
    if kind == "cubic":
        return (1.0 - progress) ** 3
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule kind {kind!r}")


@dataclass(frozen=True)
class Schedule:
    """When pruning events happen and the widths each one leaves, from `full` to `target`."""

    kind: str  # cubic | linear | one_shot
    start: int
    end: int
    interval: int
    full: Shape
    target: Shape

    @classmethod
    def of(cls, pruning: Any, full: Shape, target: Shape) -> Schedule:
        """From a recipe's `pruning` section (kind, start_step, end_step, interval)."""
        p = pruning
        return cls(p.schedule, p.start_step, p.end_step, p.interval, full, target)

    @classmethod
    def one_shot(cls, full: Shape, target: Shape) -> Schedule:
        """Everything at step 0."""
        return cls("one_shot", 0, 0, 1, full, target)

    def remaining(self, step: int) -> float:
        return remaining(step, self.kind, self.start, self.end)

    def is_event(self, step: int) -> bool:
        """Pruning events: every `interval` steps in [start, end], and always at `end` itself."""
        if self.kind == "one_shot":
            return step == self.start
        return self.start <= step <= self.end and (
            (step - self.start) % self.interval == 0 or step == self.end
        )

    def events_in(self, first: int, stop: int) -> bool:
        """Whether a pruning event falls in steps first..stop-1 (constant time)."""
        if self.kind == "one_shot":
            return first <= self.start < stop
        lo, hi = max(first, self.start), min(stop - 1, self.end)
        if lo > hi:
            return False
        if hi == self.end:
            return True
        nxt = self.start + -(-(lo - self.start) // self.interval) * self.interval
        return nxt <= hi

    def widths_at(self, step: int) -> Shape:
        """Keep-counts of every structure kind after the pruning event at `step`.

        Rounded to whole structures; never below the target, never above the full width. Layers
        are not counted down: they fade (see `layer_fade`) and are removed when their fade
        reaches 0.
        """
        r, full, target = self.remaining(step), self.full, self.target

        def lerp(full_w: int, target_w: int) -> int:
            return max(target_w, min(full_w, target_w + round((full_w - target_w) * r)))

        return Shape(
            layers=full.layers if r > 0 else target.layers,
            hidden=lerp(full.hidden, target.hidden),
            heads=lerp(full.heads, target.heads),
            head_dim=lerp(full.head_dim, target.head_dim),
            ffn=lerp(full.ffn, target.ffn),
        )

    def widths_in_force(self, step: int) -> Shape:
        """The widths the student trains at during `step`: those of the last pruning event at or
        before it (the full widths before the first)."""
        if step < self.start:
            return self.full
        if self.kind == "one_shot" or step >= self.end:
            last = self.start if self.kind == "one_shot" else self.end
        else:
            last = self.start + (step - self.start) // self.interval * self.interval
        return self.widths_at(last)

    def width_runs(self, steps: int) -> list[tuple[Shape, int]]:
        """The widths in force over steps 0..steps-1 as runs of (widths, number of steps), in
        order. Widths never grow, so each run's end is found by bisection: the cost grows with the
        number of distinct widths, not with the steps."""
        runs, step = [], 0
        while step < steps:
            current, lo, hi = self.widths_in_force(step), step, steps - 1
            while lo < hi:  # the last step at `current`
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self.widths_in_force(mid) == current else (lo, mid - 1)
            runs.append((current, lo - step + 1))
            step = lo + 1
        return runs

    def layer_fade(self, step: int) -> float:
        """Fade of a layer chosen for removal: 1 = the layer as trained, 0 = identity (removable).

        Follows the same curve as the widths, so depth fades out alongside width (our extension).
        """
        return self.remaining(step)

    def shapes_by_step(self, steps: int) -> list[Shape]:
        """The widths the student computes at, step by step, when every pruning event cuts what it
        pruned (progressive slimming): the widths of the last event so far (the layers chosen for
        removal count until their fade reaches 0, as in `widths_at`). Masking alone computes at
        `full` every step."""
        out, current = [], self.full
        for step in range(steps):
            if self.is_event(step):
                current = self.widths_at(step)
            out.append(current)
        return out


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up then linear decay to 0 at `total`."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * max(0.0, (total - step) / max(1, total - warmup))
