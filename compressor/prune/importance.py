"""Importance scores: per-parameter sensitivity with EMA (+ optional uncertainty), then summed
over the parameters each prunable structure spans.

    I      = |theta * dL/dtheta|          (sensitivity; `magnitude` ablation: |theta|)
    I_bar <- b1 * I_bar + (1 - b1) * I
    U_bar <- b2 * U_bar + (1 - b2) * |I - I_bar|
    score  = I_bar * U_bar                (PLATON, `uncertainty: true`), else I_bar

Noise floor (ours). While the student equals the teacher every distillation loss sits at its
minimum and its gradient is 0 in exact arithmetic; in floats it is rounding noise that differs
from CPU to CPU. `noise_floor` turns one backward pass at that point into a per-kind floor (the
largest structure score pure noise produces), and `signal_margins` compares a state's scores with
it: a decision is only taken from scores whose margin over the floor is large (`pruning.
min_signal_margin`), never from noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.arch import architecture_for
from compressor.shapes import Shape

REMOVED = "__removed__"  # key of the removed entries' structure sums among entry scores
GHOST_KINDS = ("hidden", "qk", "vo", "heads", "ffn")


@dataclass
class EmaState:
    """The EMA per entry. After a progressive slim (progressive.py) the entries cut out are gone,
    but their EMA still adds to the scores of the structures they crossed, exactly as while they
    were masked: `removed` keeps, per structure kind, their sums of I_bar ("i"), I_bar * U_bar
    ("iu") and I_bar^2 ("ii"), which evolve in closed form (a removed weight is 0: its I is 0)."""

    i_bar: dict[str, torch.Tensor]
    u_bar: dict[str, torch.Tensor]
    steps: int = 0
    removed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def zeros_like(cls, params: dict[str, torch.Tensor]) -> EmaState:
        return cls(
            {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()},
            {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()},
        )

    def to_dict(self) -> dict:
        return {"i_bar": self.i_bar, "u_bar": self.u_bar, "steps": self.steps,
                "removed": self.removed}  # fmt: skip

    def reset(self) -> None:
        """Forget everything seen (before a fresh probe)."""
        ghosts = [v for d in self.removed.values() for v in d.values()]
        for v in [*self.i_bar.values(), *self.u_bar.values(), *ghosts]:
            v.zero_()
        self.steps = 0

    @classmethod
    def from_dict(cls, d: dict, device: torch.device | str = "cpu") -> EmaState:
        def on(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device) for k, v in t.items()}

        removed = {k: on(v) for k, v in (d.get("removed") or {}).items()}
        return cls(on(d["i_bar"]), on(d["u_bar"]), int(d["steps"]), removed)

    def mean_importance(self, b1: float) -> dict[str, torch.Tensor]:
        """I_bar without the start-up bias of an EMA begun at 0 (the mean |theta * grad| seen)."""
        correction = 1.0 - b1**self.steps if self.steps else 1.0
        out = {n: v / correction for n, v in self.i_bar.items()}
        if self.removed:
            out[REMOVED] = {k: v / correction for k, v in self.removed["i"].items()}
        return out


def instant_importance(param: torch.Tensor, grad: torch.Tensor | None, kind: str) -> torch.Tensor:
    """One step's importance of every entry of a tensor."""
    if kind == "magnitude":
        return param.detach().abs().float()
    if grad is None:
        return torch.zeros_like(param, dtype=torch.float32)
    return (param.detach() * grad.detach()).abs().float()


@torch.no_grad()
def ema_update(
    i_bar: torch.Tensor, u_bar: torch.Tensor, inst: torch.Tensor, b1: float, b2: float
) -> None:
    """In-place EMA of importance and of its uncertainty."""
    i_bar.mul_(b1).add_(inst, alpha=1 - b1)
    u_bar.mul_(b2).add_((inst - i_bar).abs_(), alpha=1 - b2)


def magnitudes(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: instant_importance(p, None, "magnitude") for n, p in params.items()}


def entry_scores(state: EmaState, uncertainty: bool) -> dict[str, torch.Tensor]:
    """Final per-entry scores from the EMA state (and the removed entries' structure sums)."""
    out = (
        {n: state.i_bar[n] * state.u_bar[n] for n in state.i_bar}
        if uncertainty
        else dict(state.i_bar)
    )
    if state.removed:
        out[REMOVED] = state.removed["iu" if uncertainty else "i"]
    return out


@torch.no_grad()
def update_state(
    state: EmaState, params: dict[str, torch.Tensor], kind: str, b1: float, b2: float
) -> None:
    for name, p in params.items():
        ema_update(
            state.i_bar[name], state.u_bar[name], instant_importance(p, p.grad, kind), b1, b2
        )
    if state.removed:
        advance_removed(state.removed, b1, b2)
    state.steps += 1


@torch.no_grad()
def advance_removed(removed: dict[str, dict[str, torch.Tensor]], b1: float, b2: float) -> None:
    """One EMA update of removed entries (I = 0): I_bar' = b1 I_bar, U_bar' = b2 U_bar + (1 - b2)
    b1 I_bar, so the sums go i' = b1 i, iu' = b1 b2 iu + b1^2 (1 - b2) ii, ii' = b1^2 ii."""
    for k in removed["i"]:
        removed["i"][k].mul_(b1)
        removed["iu"][k].mul_(b1 * b2).add_(removed["ii"][k], alpha=b1 * b1 * (1 - b2))
        removed["ii"][k].mul_(b1 * b1)


def noise_floor(noise_scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per structure kind, the largest score that pure rounding noise produced."""
    return {k: float(v.double().max()) for k, v in noise_scores.items()}


def signal_margins(
    scores: dict[str, torch.Tensor], floor: dict[str, float], alive: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per structure kind, the median score of the alive structures over the kind's noise floor
    (inf where the floor is exactly 0). A kind with nothing alive is left out."""
    out = {}
    for k, v in scores.items():
        kept = v.double()[alive[k]] if k in alive else v.double().flatten()
        if kept.numel() == 0 or k not in floor:
            continue
        median = float(kept.median())
        out[k] = median / floor[k] if floor[k] > 0 else (float("inf") if median > 0 else 0.0)
    return out


@torch.no_grad()
def structure_scores(
    model: nn.Module,
    entry: dict[str, torch.Tensor],
    head_dim: int,
    layers_kept: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Sum entry scores over every tensor each structure spans (the coupling of masks.py). The
    hidden dims sum over the layers that stay (`layers_kept`; all when None): a layer fading out
    is deleted, so its weights say nothing about which hidden dims matter. `entry[REMOVED]`, when
    present, adds the sums of entries a progressive slim cut out."""
    by_tensor = {id(p): entry[n] for n, p in model.named_parameters() if n in entry}

    def s(t: torch.Tensor) -> torch.Tensor:
        return by_tensor[id(t)]

    arch = architecture_for(model)
    n_layers = arch.num_layers(model)
    emb = arch.embeddings(model)
    hidden = sum(s(e.weight).sum(0) for e in emb.tables()) + s(emb.ln.weight) + s(emb.ln.bias)
    qk, vo, ffn = [], [], []
    for i in range(n_layers):
        t = arch.layer(model, i)
        q_w, k_w, v_w, o_w = s(t.q.weight), s(t.k.weight), s(t.v.weight), s(t.o.weight)
        n_heads = q_w.shape[0] // head_dim
        qk.append((q_w.sum(1) + s(t.q.bias) + k_w.sum(1) + s(t.k.bias)).view(n_heads, head_dim))
        vo.append((v_w.sum(1) + s(t.v.bias) + o_w.sum(0)).view(n_heads, head_dim))
        in_w, out_w = s(t.inter.weight), s(t.out.weight)
        ffn.append(in_w.sum(1) + s(t.inter.bias) + out_w.sum(0))
        if layers_kept is not None and not bool(layers_kept[i]):
            continue
        hidden += q_w.sum(0) + k_w.sum(0) + v_w.sum(0) + in_w.sum(0)
        hidden += o_w.sum(1) + s(t.o.bias) + out_w.sum(1) + s(t.out.bias)
        for ln in (t.attn_ln, t.out_ln):
            hidden += s(ln.weight) + s(ln.bias)
    p = arch.pooler(model)
    if p is not None and id(p.weight) in by_tensor:
        hidden += s(p.weight).sum(0) + s(p.weight).sum(1) + s(p.bias)
    head = arch.mlm_head(model)
    if head is not None:
        d, ln = head.dense, head.ln
        hidden += s(d.weight).sum(0) + s(d.weight).sum(1) + s(d.bias) + s(ln.weight) + s(ln.bias)
    qk_t, vo_t = torch.stack(qk), torch.stack(vo)
    out = {
        "hidden": hidden,
        "qk": qk_t,
        "vo": vo_t,
        "heads": qk_t.sum(2) + vo_t.sum(2),
        "ffn": torch.stack(ffn),
    }
    if arch.shared_heads:
        table = arch.relative_bias(model)
        bias = (
            s(table.weight).sum(0) if table is not None and id(table.weight) in by_tensor else None
        )
        out["heads"] = shared_head_scores(out["heads"], layers_kept, bias)
    if REMOVED in entry:
        out = {k: v + entry[REMOVED][k] for k, v in out.items()}
    return out


def shared_head_scores(
    heads: torch.Tensor, layers_kept: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """Head scores [L, H] of a family whose heads are one set for every layer (a relative-position
    bias table shared by all layers, one column per head, `bias`: its entry scores summed per
    head): each head's score summed over the layers that stay, plus its column of the table, the
    same in every row, so every layer keeps the same heads."""
    rows = heads if layers_kept is None else heads[layers_kept.to(heads.device)]
    total = rows.sum(0) if bias is None else rows.sum(0) + bias
    return total.expand_as(heads).clone()


def truncation_scores(full: Shape) -> dict[str, torch.Tensor]:
    """Scores that keep the first k of every structure (DistilBERT-style width truncation):
    strictly decreasing with the index, so `keep_top_k` keeps indices 0..k-1."""

    def first(*shape: int) -> torch.Tensor:
        return (-torch.arange(shape[-1], dtype=torch.float32)).expand(*shape).clone()

    return {
        "hidden": first(full.hidden),
        "heads": first(full.layers, full.heads),
        "qk": first(full.layers, full.heads, full.head_dim),
        "vo": first(full.layers, full.heads, full.head_dim),
        "ffn": first(full.layers, full.ffn),
    }
