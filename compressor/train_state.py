"""What a checkpoint stores of the training loop, and how the loop's objects are rebuilt from it,
bit for bit. Stored is only what the rest of the run can read:

- the student, as the rows and columns where it differs from the student the run started with
  (pruned entries are exactly 0; unseen vocabulary rows still equal the start); a tied tensor
  once;
- the optimizer's moments with the pruned entries zeroed: those moments only move weights that
  `zero_pruned_weights` zeroes again after every step, so nothing ever reads them; stored as the
  rows and columns that are not zero;
- the importance EMA only while a pruning step remains (after the last one nothing reads it).
  Until then it is kept whole, pruned entries included: they still add to the scores of the
  hidden dims they cross;
- after a progressive slim (prune/progressive.py), the kept teacher indices (`units`): the run's
  starting student, cut by them, is the base, and the removed entries' importance sums are kept;
- every process's random generators (the CPU's, and the GPU's on CUDA);
- never the teacher.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from compressor.checkpoint import pack_delta, unpack_delta
from compressor.prune import schedule
from compressor.prune.importance import EmaState
from compressor.prune.masks import Masks, zero_pruned_weights
from compressor.recipe import Recipe

MOMENTS = ("exp_avg", "exp_avg_sq")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as it starts (on the CPU): the base its checkpoints are stored against."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def pruned_entries(model: torch.nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """Per parameter name, the entries `zero_pruned_weights` zeroes under `masks` (CPU, bool)."""
    probe = copy.deepcopy(model)
    for p in probe.parameters():
        p.fill_(1)
    zero_pruned_weights(probe, masks)
    return {n: (p == 0).cpu() for n, p in probe.named_parameters()}


def student_bases(
    initial: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {
        k: torch.where(pruned[k], torch.zeros_like(v), v) if k in pruned else v
        for k, v in initial.items()
    }


def pack_student(
    model: torch.nn.Module, initial: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor]
) -> dict[str, Any]:
    base = student_bases(initial, pruned)
    out: dict[str, Any] = {}
    first: dict[int, str] = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if key in first:
            out[k] = {"same_as": first[key]}  # a tied tensor, stored once
            continue
        first[key] = k
        out[k] = pack_delta(v, base[k])
    return out


def unpack_student(
    packed: dict[str, Any], initial: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    base = student_bases(initial, pruned)
    out = {k: unpack_delta(v, base[k]) for k, v in packed.items() if "same_as" not in v}
    return {k: out[v["same_as"]] if "same_as" in v else out[k] for k, v in packed.items()}


def optimizer_names(optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor]) -> list:
    """The parameter name of every index in the optimizer's state dict (None: not a student's)."""
    by_id = {id(p): n for n, p in named.items()}
    return [by_id.get(id(p)) for g in optimizer.param_groups for p in g["params"]]


def pack_optimizer(
    optimizer: torch.optim.Optimizer, names: list, pruned: dict[str, torch.Tensor]
) -> dict[str, Any]:
    sd = optimizer.state_dict()
    state = {}
    for i, st in sd["state"].items():
        mask = pruned.get(names[i])
        state[i] = {
            k: pack_delta(v if mask is None else v.masked_fill(mask.to(v.device), 0))
            if k in MOMENTS
            else v
            for k, v in st.items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}


def unpack_optimizer(packed: dict[str, Any]) -> dict[str, Any]:
    state = {
        i: {k: unpack_delta(v) if k in MOMENTS else v for k, v in st.items()}
        for i, st in packed["state"].items()
    }
    return {"state": state, "param_groups": packed["param_groups"]}


def pruning_remains(r: Recipe, next_step: int) -> bool:
    p = r.pruning
    last = min(r.train.steps, max(p.start_step, p.end_step) + 1)  # no event after end_step
    return any(
        schedule.is_pruning_step(s, p.start_step, p.end_step, p.interval, p.schedule)
        for s in range(next_step, last)
    )


def pack_importance(state: EmaState, r: Recipe, next_step: int) -> dict[str, Any] | None:
    if not pruning_remains(r, next_step):
        return None
    out = {
        "i_bar": {n: pack_delta(v) for n, v in state.i_bar.items()},
        "u_bar": {n: pack_delta(v) for n, v in state.u_bar.items()},
        "steps": state.steps,
    }
    if state.removed:  # a progressive slim's removed entries (importance.py), whole
        out["removed"] = {q: {k: v.cpu().clone() for k, v in d.items()}
                          for q, d in state.removed.items()}  # fmt: skip
    return out


def unpack_importance(
    packed: dict[str, Any] | None, fresh: EmaState, device: torch.device
) -> EmaState:
    """The stored EMA, or `fresh` (zeros) where none was stored because nothing reads it."""
    if packed is None:
        return fresh
    ema = {k: {n: unpack_delta(v) for n, v in packed[k].items()} for k in ("i_bar", "u_bar")}
    removed = packed.get("removed")
    return EmaState.from_dict({**ema, "steps": packed["steps"], "removed": removed}, device)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random generators: the CPU's, and the GPU's when training on one."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
