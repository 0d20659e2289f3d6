"""The pruning schedule as pure functions of the step.

`remaining(t)` is the fraction of the way from the target back to the full width: 1 before
`start`, 0 from `end` on. Widths interpolate between teacher and target with it, so every
structure kind shrinks by the same fraction at the same time (the paper's uniform allocation).
"""

from __future__ import annotations

from compressor.shapes import Shape


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


def is_pruning_step(step: int, start: int, end: int, interval: int, kind: str) -> bool:
    """Pruning events: every `interval` steps in [start, end], and always at `end` itself."""
    if kind == "one_shot":
        return step == start
    return start <= step <= end and ((step - start) % interval == 0 or step == end)


def widths_at(step: int, full: Shape, target: Shape, kind: str, start: int, end: int) -> Shape:
    """Keep-counts of every structure kind after the pruning event at `step`.

    Rounded to whole structures; never below the target, never above the full width. Layers are
    not counted down: they fade (see `layer_fade`) and are removed when their fade reaches 0.
    """
    r = remaining(step, kind, start, end)

    def lerp(full_w: int, target_w: int) -> int:
        return max(target_w, min(full_w, target_w + round((full_w - target_w) * r)))

    return Shape(
        layers=full.layers if r > 0 else target.layers,
        hidden=lerp(full.hidden, target.hidden),
        heads=lerp(full.heads, target.heads),
        head_dim=lerp(full.head_dim, target.head_dim),
        ffn=lerp(full.ffn, target.ffn),
    )


def widths_in_force(
    step: int, full: Shape, target: Shape, kind: str, start: int, end: int, interval: int
) -> Shape:
    """The widths the student trains at during `step`: those of the last pruning event at or
    before it (the full widths before the first)."""
    if step < start:
        return full
    if kind == "one_shot" or step >= end:
        last = start if kind == "one_shot" else end
    else:
        last = start + (step - start) // interval * interval
    return widths_at(last, full, target, kind, start, end)


def width_runs(
    steps: int, full: Shape, target: Shape, kind: str, start: int, end: int, interval: int
) -> list[tuple[Shape, int]]:
    """The widths in force over steps 0..steps-1 as runs of (widths, number of steps), in order.
    Widths never grow, so each run's end is found by bisection: the cost grows with the number of
    distinct widths, not with the steps."""

    def at(step: int) -> Shape:
        return widths_in_force(step, full, target, kind, start, end, interval)

    runs, step = [], 0
    while step < steps:
        current, lo, hi = at(step), step, steps - 1
        while lo < hi:  # the last step at `current`
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if at(mid) == current else (lo, mid - 1)
        runs.append((current, lo - step + 1))
        step = lo + 1
    return runs


def layer_fade(step: int, kind: str, start: int, end: int) -> float:
    """Fade of a layer chosen for removal: 1 = the layer as trained, 0 = identity (removable).

    Follows the same curve as the widths, so depth fades out alongside width (our extension).
    """
    return remaining(step, kind, start, end)


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up then linear decay to 0 at `total`."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * max(0.0, (total - step) / max(1, total - warmup))


def shapes_by_step(full: Shape, target: Shape, kind: str, start: int, end: int, interval: int,
                   steps: int) -> list[Shape]:  # fmt: skip
    """The widths the student computes at, step by step, when every pruning event cuts what it
    pruned (progressive slimming): the widths of the last event so far (the layers chosen for
    removal count until their fade reaches 0, as in `widths_at`). Masking alone computes at
    `full` every step."""
    out, current = [], full
    for step in range(steps):
        if is_pruning_step(step, start, end, interval, kind):
            current = widths_at(step, full, target, kind, start, end)
        out.append(current)
    return out
