"""The training state: everything of a distillation run that changes as it trains (student,
hidden-state maps, layer fades, optimizer, importance, masks, and the units a progressive slim
kept), with how it starts, learns from a step, is cut, and is stored in and restored from a
checkpoint, bit for bit. Stored is only what the rest of the run can read:

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
- never the teacher (every process's random generators are the loop's: distill.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.nn.utils import clip_grad_norm_

from compressor import distributed
from compressor.bert_params import student_parameters
from compressor.checkpoint import Checkpoint, pack_delta, unpack_delta
from compressor.checks import check_finite_losses
from compressor.errors import CheckFailed
from compressor.losses import Correspondence, HiddenMaps, StudentLoss
from compressor.prune.importance import EmaState, update_state
from compressor.prune.masks import HostMasks, Masks, MasksMemo, PrunedIndex, zero_pruned_weights
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
from compressor.recipe import Recipe
from compressor.shapes import Shape
from compressor.teacher import Teacher

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


def pack_importance(state: EmaState, needed: bool) -> dict[str, Any] | None:
    """The EMA as stored: None when no pruning event remains to read it."""
    if not needed:
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


FADE = "__layer_fade__"  # the layer fades' name among the tensors importance is kept for


@dataclass(eq=False)
class TrainingState:
    """What learns and what is ranked, and what the next step needs of them. `masks.fade` is
    always `fade`, the parameter whose gradient ranks the layers; `units` (None until a
    progressive slim cuts the student) names the teacher's units the student still has;
    `initial` is the base checkpoints store the student against; `model` is the student, maps
    and fades as one module (what DDP wraps)."""

    recipe: Recipe
    full: Shape  # the teacher's shape
    student: torch.nn.Module
    maps: HiddenMaps
    fade: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    importance: EmaState
    masks: Masks
    initial: dict[str, torch.Tensor]
    units: Units | None = None
    model: torch.nn.Module | None = None
    wrapped: tuple[bool, torch.device] | None = None  # what `model` was built with
    # the fade of the layers chosen for removal, as `fade_layers` last wrote it or a checkpoint
    # held it (None: unknown); with the host's view of the masks, the widths need no device read
    host_fade: float | None = 1.0
    host_masks: MasksMemo = field(default_factory=lambda: MasksMemo(HostMasks.of))
    pruned_index: MasksMemo = field(default_factory=lambda: MasksMemo(PrunedIndex.of))
    # the gradient norms summed since they were last checked (learn), and the first such step
    unchecked_norm: torch.Tensor | None = None
    unchecked_since: int | None = None

    @classmethod
    def start(
        cls, recipe: Recipe, full: Shape, student: torch.nn.Module, device: torch.device
    ) -> TrainingState:
        """The state of step 0: the student as given, identity maps, nothing pruned or faded."""
        maps = HiddenMaps(full.layers + 1, full.hidden).to(device)
        optimizer = make_optimizer(student_parameters(student), maps, recipe)
        masks = Masks.full(full, device)
        fade = torch.nn.Parameter(masks.fade.clone())  # dL/dfade ranks the layers
        params = student_parameters(student)
        importance = EmaState.zeros_like({**params, FADE: fade})
        masks = replace(masks, fade=fade)
        return cls(recipe, full, student, maps, fade, optimizer, importance, masks,
                   snapshot(student))  # fmt: skip

    # ------------------------------------------------------------------ what it holds

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return student_parameters(self.student)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor importance is kept for: the student's parameters and the layer fades."""
        return {**self.params, FADE: self.fade}

    def set_masks(self, masks: Masks) -> None:
        self.masks = replace(masks, fade=self.fade)

    def fade_layers(self, value: float) -> None:
        """The layers chosen for removal take fade `value`; the others stay at 1."""
        with torch.no_grad():
            self.fade.copy_(torch.where(self.masks.layers, 1.0, value))
        self.host_fade = float(value)

    def final_masks(self) -> Masks:
        return replace(self.masks, fade=self.fade.detach())

    def widths(self) -> Shape:
        """`final_masks().widths()`, known on the host: the masks' widths are read once per
        change of the masks, the layers chosen for removal count while their fade is not 0."""
        if self.host_fade is None:
            return self.final_masks().widths()
        h = self.host_masks(self.masks)
        removed = h.layers.count(False) if self.host_fade == 0 else 0
        return replace(h.widths, layers=len(h.layers) - removed)

    def is_teacher_copy(self) -> bool:
        """True while the student is still exactly its teacher and every loss term is at its
        minimum: initialised as a copy, trained without dropout or an MLM loss, nothing pruned or
        faded, and no optimizer step taken yet."""
        r, m = self.recipe, self.masks
        return (
            self.units is None  # a slimmed student's masks are all alive, but it is not its teacher
            and r.student.init == "teacher"
            and r.distill.student_dropout == 0
            and r.distill.mlm == 0  # the MLM loss is not at its minimum at the teacher
            and not self.optimizer.state
            and all(bool(getattr(m, k).all()) for k in ("hidden", "heads", "qk", "vo", "ffn"))
            and bool((m.fade == 1).all())
        )

    # ------------------------------------------------------------------ training

    def wrap(self, with_logits: bool, device: torch.device) -> None:
        """Build the module the micro-steps run (under torchrun: DDP-wrapped; a cut builds it
        again, since DDP holds the parameters it was built with)."""
        loss = StudentLoss(self.student, self.maps, self.fade, with_logits)
        loss.correspondence = self.correspondence()
        self.model = distributed.wrap(loss, device)
        self.wrapped = (with_logits, device)

    def correspondence(self) -> Correspondence | None:
        u = self.units
        return None if u is None else Correspondence(u.layers.tolist(), list(u.heads), u.hidden)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def learn(self, step: int, update: bool, rank: bool, check: bool = True) -> None:
        """After the micro-steps' backward passes: importance from this step's gradients
        (dL/dtheta, before clipping; only while `rank`: a pruning event is left to read it),
        clipping, the optimizer step (when `update`: a student that still is its teacher learns
        nothing); then the gradients cleared and the pruned weights re-zeroed. The gradient norm
        is checked for finiteness (with those of the steps since the last check) when `check`;
        otherwise nothing is read from the device (`check_norms` before anything is saved)."""
        p, tr = self.recipe.pruning, self.recipe.train
        if update:
            params = self.params
            if rank and p.importance != "truncate":
                update_state(self.importance, {**params, FADE: self.fade}, p.importance, p.beta1,
                             p.beta2)  # fmt: skip
            norm = clip_grad_norm_([*params.values(), *self.maps.parameters()], tr.max_grad_norm)
            if self.unchecked_norm is None:
                self.unchecked_norm, self.unchecked_since = norm.detach(), step
            else:
                self.unchecked_norm = self.unchecked_norm + norm.detach()
            if check:
                self.check_norms(step)
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        zero_pruned_weights(self.student, self.masks, self.pruned_index(self.masks))

    def check_norms(self, step: int) -> None:
        """Stop at a non-finite gradient norm among those not yet checked (one device read)."""
        if self.unchecked_norm is None:
            return
        value, first = float(self.unchecked_norm), self.unchecked_since
        self.unchecked_norm = self.unchecked_since = None
        check_finite_losses(step, {window_name("gradient norm", first, step): value})

    def cut(self, cut: Units) -> None:
        """Cut the kept units out of everything that holds the student's units (progressive.py):
        the student and the maps' inputs in place; the optimizer (AdamW's moments cut alike), the
        importance state, the masks over the kept units, a new fade parameter, and the base the
        checkpoints store the student against."""
        masks, student, maps, optimizer = self.masks, self.student, self.maps, self.optimizer
        head_dim = masks.qk.shape[2]
        cuts = tensor_cuts(student, cut, head_dim)
        self.importance = cut_importance(self.importance, student, cut, head_dim, masks.layers,
                                         FADE)  # fmt: skip
        old = named_trainables(student, maps)
        moments = {n: optimizer.state[t] for n, t in old.items() if t in optimizer.state}
        lrs = [g["lr"] for g in optimizer.param_groups]
        self.initial = cut_named(self.initial, cuts, cut)
        cut_student(student, cut, head_dim)
        cut_maps_inputs(maps, cut.hidden)
        self.optimizer = make_optimizer(student_parameters(student), maps, self.recipe)
        for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr
        new = named_trainables(student, maps)
        for n, st in moments.items():
            kind, _, rest = n.partition(".")
            name = renamed(rest, cut) if kind == "student" else rest
            if name is None:
                continue  # a dropped layer's
            index = cuts[rest] if kind == "student" else (None, cut.hidden)
            self.optimizer.state[new[f"{kind}.{name}"]] = {
                k: cut_tensor(v, index) if k in MOMENTS else v for k, v in st.items()
            }
        new_masks = cut_masks(replace(masks, fade=masks.fade.detach()), cut)
        self.fade = torch.nn.Parameter(new_masks.fade.clone())
        self.set_masks(new_masks)
        self.units = (self.units or Units.identity(self.full)).then(cut)
        if self.model is not None:
            self.wrap(*self.wrapped)

    # ------------------------------------------------------------------ checkpoints

    def stored(self, importance_needed: bool) -> dict[str, Any]:
        """The checkpoint fields this state fills (checkpoint.Checkpoint)."""
        pruned = pruned_entries(self.student, self.masks)
        names = optimizer_names(self.optimizer, self.params)
        return {
            "student": pack_student(self.student, self.initial, pruned),
            "maps": self.maps.state_dict(),
            "optimizer": pack_optimizer(self.optimizer, names, pruned),
            "masks": self.final_masks().to_dict(),
            "importance": pack_importance(self.importance, importance_needed),
            "units": self.units.to_dict() if self.units is not None else None,
        }

    def restore(self, ckpt: Checkpoint, device: torch.device) -> None:
        """Continue from `ckpt`: cut as it was cut before its state loads, then load it."""
        if ckpt.units is not None:
            units = Units.from_dict(ckpt.units)
            self.cut(units)
            self.units = units  # the teacher's indices already
        masks = Masks.from_dict(ckpt.masks, device)
        pruned = pruned_entries(self.student, masks)
        self.student.load_state_dict(unpack_student(ckpt.student, self.initial, pruned))
        self.maps.load_state_dict(ckpt.maps)
        self.optimizer.load_state_dict(unpack_optimizer(ckpt.optimizer))  # moves it to the params
        with torch.no_grad():
            self.fade.copy_(masks.fade)
        removed = masks.fade[~masks.layers]  # every layer chosen for removal has the same fade
        self.host_fade = float(removed[0]) if removed.numel() else 1.0
        self.set_masks(masks)
        self.importance = unpack_importance(ckpt.importance, self.importance, device)
        check_on_device(device, self)

    def check_identical_over_ranks(self) -> None:
        weights = {**self.student.state_dict(),
                   **{f"maps.{k}": v for k, v in self.maps.state_dict().items()}}  # fmt: skip
        distributed.check_identical(
            weights, "the student's weights and maps at the end of training"
        )


def window_name(name: str, first: int, step: int) -> str:
    """A value's name in a divergence report: summed over steps first..step when they are more
    than one (read from the device only when the loop logs or saves)."""
    return name if first >= step else f"{name} (summed over steps {first}..{step})"


def make_student(teacher: Teacher, init: str = "teacher", seed: int = 0) -> torch.nn.Module:
    """The student starts as an exact copy of the teacher (HomoDistil), or, for the random-init
    baseline, as the teacher's architecture with freshly initialised weights (seeded)."""
    student = copy.deepcopy(teacher.model)
    if init == "random":
        torch.manual_seed(seed)
        student.apply(student._init_weights)  # the architecture's own initialiser
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


def named_trainables(student: torch.nn.Module, maps: HiddenMaps) -> dict[str, torch.Tensor]:
    return {**{f"student.{n}": t for n, t in student_parameters(student).items()},
            **{f"maps.{n}": t for n, t in maps.named_parameters()}}  # fmt: skip


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


def check_on_device(device: torch.device, state: TrainingState) -> None:
    """CheckFailed naming every piece of the training state that is not on `device` (a resumed
    checkpoint is loaded to the CPU first)."""
    s = state
    pieces = {
        **{f"student.{n}": t for n, t in s.student.state_dict().items()},
        **{f"maps.{n}": t for n, t in s.maps.state_dict().items()},
        **{f"importance.i_bar.{n}": t for n, t in s.importance.i_bar.items()},
        **{f"importance.u_bar.{n}": t for n, t in s.importance.u_bar.items()},
        **{f"masks.{n}": t for n, t in s.masks.__dict__.items()},
        **{
            f"optimizer.state[{i}].{k}": v
            for i, st in enumerate(s.optimizer.state.values())
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
