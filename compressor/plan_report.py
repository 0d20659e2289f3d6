"""`compress recipe check`: validate a recipe and describe what it will do, without weights."""

from __future__ import annotations

import os
from pathlib import Path

from compressor.arch import architecture_for
from compressor.budget import recipe_budget
from compressor.errors import RecipeError
from compressor.prune.schedule import Schedule
from compressor.recipe import Recipe, load_recipe, teacher_problems, with_overrides
from compressor.shapes import Shape, Vocab, config_has_mlm_head, param_count
from compressor.teacher import read_teacher_config


def plan_report(path: Path, overrides: list[str] = (), allow_large: bool = False) -> str:
    """The recipe at `path` (with `section.key=value` overrides) validated and described: teacher
    and student, the widths along the schedule, how decisions are taken, the budget. A recipe
    whose training memory estimate exceeds this machine's memory is refused unless
    `allow_large` (`--allow-large`)."""
    recipe = with_overrides(load_recipe(path), list(overrides))
    cfg = read_teacher_config(recipe.teacher)
    lines = [f"recipe {path}: valid", f"  name: {recipe.name}"]
    target = recipe.target.shape()
    if cfg is None:
        lines.append(
            f"  teacher: {recipe.teacher.id} ({recipe.teacher.source}) - config not reachable"
            " offline; checks against the teacher run when it loads"
        )
        vocab = Vocab()
        lines.append(f"  student: {target.label()}, {param_count(target, vocab) / 1e6:.1f}M params")
        lines.append(f"  budget: {tokens_line(recipe)}")
        lines.append(
            "  training FLOPs: need the teacher's config (e.g. --set teacher.source=local"
            " --set teacher.id=DIR with its config.json)"
        )
        return "\n".join(lines)
    problems = teacher_problems(recipe, cfg) or resource_problems(recipe, cfg, allow_large)
    if problems:
        raise RecipeError(str(path), problems)
    full = Shape.of_config(cfg)
    vocab = Vocab.of_config(cfg)
    mlm = config_has_mlm_head(cfg)
    pooler = architecture_for(cfg).has_pooler
    n_t = param_count(full, vocab, pooler=pooler, mlm_head=mlm)
    n_s = param_count(target, vocab, pooler=pooler, mlm_head=mlm)
    lines += [
        f"  teacher: {recipe.teacher.id} ({recipe.teacher.source}) {full.label()},"
        f" {n_t / 1e6:.1f}M params{' + MLM head' if mlm else ''}",
        f"  student: {target.label()}, {n_s / 1e6:.1f}M params ({n_s / n_t:.1%} of the teacher)",
        f"  schedule: {recipe.pruning.schedule}, steps {recipe.pruning.start_step}"
        f"..{recipe.pruning.end_step} every {recipe.pruning.interval}, of {recipe.train.steps}",
        "  widths along the schedule:",
        "    step   layers hidden heads head_dim  ffn   params",
    ]
    p = recipe.pruning
    sched = Schedule.of(p, full, target)
    span = p.end_step - p.start_step
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        step = p.start_step + round(frac * span)
        w = sched.widths_at(step)
        lines.append(
            f"    {step:>5}  {w.layers:>6} {w.hidden:>6} {w.heads:>5} {w.head_dim:>8}"
            f" {w.ffn:>5} {param_count(w, vocab, pooler=pooler, mlm_head=mlm) / 1e6:>7.1f}M"
        )
    lines.append(f"  decisions: {decision_policy(recipe)}")
    lines.append(f"  training memory (rough, fp32): {memory_estimate_gb(recipe, full, n_t):.1f} GB")
    budget = recipe_budget(recipe, full, vocab.vocab if mlm else 0)
    lines.append(f"  budget: {tokens_line(recipe)}")
    lines.append(
        f"  training FLOPs: {budget.flops:.3g} (model FLOPs: student forward + backward at the"
        " schedule's widths, hidden-state maps, teacher forward; compressor/flops.py)"
    )
    return "\n".join(lines)


def tokens_line(r: Recipe) -> str:
    b = recipe_budget(r, r.target.shape(), 0)  # tokens do not depend on the shapes
    return (
        f"{b.steps} steps x {b.sequences} sequences ({r.train.batch_size} x grad_accum"
        f" {r.train.grad_accum}) x {b.seq} tokens = {b.tokens:,} tokens ({b.tokens:.3g})"
    )


def decision_policy(r: Recipe) -> str:
    """How the pruning events will decide, in one line (see train/pruner.py, Pruner.signal)."""
    p = r.pruning
    layers = {
        "removal": f"layers by greedy removal, measured on {max(1, p.probe_batches)} batches",
        "sensitivity": "layers by fade sensitivity",
        "uniform": "layers evenly spaced",
    }[p.layer_selection]
    if p.importance != "sensitivity":
        return f"{layers}; widths by {p.importance}"
    return (
        f"{layers}; widths from the importance EMA after {p.min_history} updates, else from"
        f" {p.probe_batches} fp32 dropout probe batches; every kind's median score must be"
        f" >= {p.min_signal_margin:g}x its noise floor"
    )


def machine_memory_gb() -> float | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_gb(device: str) -> float | None:
    """The memory of the device a recipe trains on, here: this machine's for the CPU, the GPU's
    where the recipe asks for one and this machine has it; None where it is not known here (a GPU
    recipe checked on a machine without a GPU is checked where it runs)."""
    if device == "cpu":
        return machine_memory_gb()
    import torch

    if not torch.cuda.is_available():
        return machine_memory_gb() if device == "auto" else None
    index = torch.device(device if device != "auto" else "cuda").index or 0
    return torch.cuda.get_device_properties(index).total_memory / 1e9


def resource_problems(r: Recipe, cfg: dict, allow_large: bool = False) -> list[str]:
    """The training memory estimate against the memory of the device it trains on, checked before
    any work starts ([] with `allow_large`, for a machine this one is not)."""
    if allow_large:
        return []
    full = Shape.of_config(cfg)
    n_t = param_count(full, Vocab.of_config(cfg), mlm_head=config_has_mlm_head(cfg))
    need, have = memory_estimate_gb(r, full, n_t), device_memory_gb(r.train.device)
    if have is None or need <= have:
        return []
    return [
        f"train.batch_size={r.train.batch_size} x data.max_length={r.data.max_length}: training"
        f" needs about {need:,.1f} GB of memory (rough estimate), the {r.train.device} device here"
        f" has {have:.1f} GB;"
        " lower train.batch_size (raise train.grad_accum for the same global batch) or"
        " data.max_length, or pass --allow-large to run it anyway on a machine that has it"
    ]


def memory_estimate_gb(r: Recipe, full: Shape, n_params: int) -> float:
    """Teacher weights + student weights, grads, AdamW moments and importance EMAs (x6), plus
    the student's saved activations for one micro-batch. A rough guide, not a promise."""
    b, t = r.train.batch_size, r.data.max_length
    per_layer = b * t * (12 * full.hidden + 3 * full.ffn) + 3 * b * full.heads * t * t
    activations = full.layers * per_layer * 4
    maps = (full.layers + 1) * full.hidden**2 * 4 * 4
    return (n_params * 4 * 7 + maps + activations) / 1e9
