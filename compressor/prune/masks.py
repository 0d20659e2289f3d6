"""Pruning masks: which structures of the student are still alive. Masks only ever shrink.

Coupling (what moves together) is expressed here once (tensors by role; each family's adapter in
compressor/arch/ says where they live):
- FFN neuron j of layer l: row j + bias j of FFN-in, column j of FFN-out.
- Head h of layer l: its Q/K/V rows and its columns of O. Where the family shares one
  relative-position bias over all layers (MPNet), head h is also column h of that table, and
  every layer keeps the same heads (importance.structure_scores scores heads globally).
- Q/K dim e of head h: row h*dh+e of Q and of K (they meet in the dot product).
- V/O dim e of head h: row h*dh+e of V and column h*dh+e of O.
- Hidden dim d: one global mask over every tensor that reads or writes the residual stream.
- Layer l: a fade value taking the layer to the identity; removed once its fade is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from compressor.arch import architecture_for
from compressor.shapes import Shape


@dataclass(frozen=True)
class Masks:
    hidden: torch.Tensor  # [D] bool
    heads: torch.Tensor  # [L, H] bool
    qk: torch.Tensor  # [L, H, dh] bool (dims of Q and K inside each head)
    vo: torch.Tensor  # [L, H, dh] bool (dims of V and O inside each head)
    ffn: torch.Tensor  # [L, I] bool
    layers: torch.Tensor  # [L] bool: False = chosen for removal (fading via `fade`)
    fade: torch.Tensor  # [L] float: 1 = layer as trained, 0 = identity (a layer being removed)

    @classmethod
    def full(cls, s: Shape, device: torch.device | str = "cpu") -> Masks:
        def ones(*shape):
            return torch.ones(*shape, dtype=torch.bool, device=device)

        return cls(
            hidden=ones(s.hidden),
            heads=ones(s.layers, s.heads),
            qk=ones(s.layers, s.heads, s.head_dim),
            vo=ones(s.layers, s.heads, s.head_dim),
            ffn=ones(s.layers, s.ffn),
            layers=ones(s.layers),
            fade=torch.ones(s.layers, device=device),
        )

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).cpu() for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], device="cpu") -> Masks:
        return cls(**{f.name: d[f.name].to(device) for f in fields(cls)})

    def to(self, device: torch.device | str) -> Masks:
        return Masks(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def qk_rows(self, layer: int) -> torch.Tensor:
        """Alive rows of Q and K of one layer, flattened to [H*dh] (head mask applied)."""
        return (self.qk[layer] & self.heads[layer, :, None]).flatten()

    def vo_rows(self, layer: int) -> torch.Tensor:
        return (self.vo[layer] & self.heads[layer, :, None]).flatten()

    def tensor_shape(self) -> Shape:
        """The widths the masks span: the student's tensors (the teacher's until a progressive
        slim cuts them)."""
        return spanned_shape(self)

    def widths(self) -> Shape:
        """Current alive widths (uniform by construction); a fading layer still counts."""
        alive = self.heads
        return Shape(
            layers=int((self.layers | (self.fade > 0)).sum()),
            hidden=int(self.hidden.sum()),
            heads=int(alive.sum(1).min()),
            head_dim=int(self.qk.sum(2).min()),
            ffn=int(self.ffn.sum(1).min()),
        )

    def is_subset_of(self, other: Masks) -> bool:
        """True when every structure alive here is alive in `other` (masks only shrink)."""
        return all(
            not bool((getattr(self, n) & ~getattr(other, n)).any())
            for n in ("hidden", "heads", "qk", "vo", "ffn", "layers")
        )


def keep_top_k(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest-scoring alive entries along the last dim; dead entries never return.

    Ties break towards the lower index, so decisions are deterministic.
    """
    n = scores.shape[-1]
    if k >= n:
        return alive.clone()
    masked = torch.where(alive, scores.double(), torch.tensor(float("-inf"), dtype=torch.float64))
    # stable descending order: sort by (-score, index)
    order = torch.argsort(-masked, dim=-1, stable=True)
    keep = torch.zeros_like(alive)
    keep.scatter_(-1, order[..., :k], True)
    return keep & alive


def prune_to(masks: Masks, scores: dict[str, torch.Tensor], w: Shape) -> Masks:
    """Shrink every mask to the widths `w`, keeping the highest-scoring structures.

    Widths are per weight matrix (same count in every layer / head), the paper's allocation.
    Layers are not selected here (see `select_layers`).
    """
    heads = keep_top_k(scores["heads"], masks.heads, w.heads)
    return replace(
        masks,
        hidden=keep_top_k(scores["hidden"], masks.hidden, w.hidden),
        heads=heads,
        qk=keep_top_k(scores["qk"], masks.qk, w.head_dim),
        vo=keep_top_k(scores["vo"], masks.vo, w.head_dim),
        ffn=keep_top_k(scores["ffn"], masks.ffn, w.ffn),
    )


def select_layers(layer_scores: torch.Tensor, keep: int, how: str) -> torch.Tensor:
    """Which layers survive: the `keep` most sensitive, or evenly spaced (DistilBERT-style)."""
    n = layer_scores.numel()
    if how == "uniform":
        idx = torch.tensor([(i + 1) * n // keep - 1 for i in range(keep)])
        out = torch.zeros(n, dtype=torch.bool)
        out[idx] = True
        return out
    return keep_top_k(layer_scores, torch.ones(n, dtype=torch.bool), keep)


def greedy_layer_removal(
    n: int, keep: int, round_costs: Callable[[torch.Tensor], dict[int, float]]
) -> tuple[torch.Tensor, list[dict[int, float]]]:
    """Backward elimination: remove, one at a time, the layer whose removal costs least until
    `keep` remain. `round_costs(kept)`: for each kept layer, the cost (lower is better) of the kept
    set without it. Ties go to the higher index. Returns the kept mask and every round's cost per
    candidate layer (the evidence of the decision)."""
    kept = torch.ones(n, dtype=torch.bool)
    rounds = []
    while int(kept.sum()) > keep:
        costs = {int(i): float(c) for i, c in round_costs(kept.clone()).items()}
        if sorted(costs) != kept.nonzero().flatten().tolist():
            raise ValueError(f"round costs for layers {sorted(costs)}, kept {kept.tolist()}")
        drop = min(costs, key=lambda i: (costs[i], -i))
        kept[drop] = False
        rounds.append(costs)
    return kept, rounds


@dataclass(frozen=True)
class PrunedIndex:
    """The pruned entries of masks as index tensors on the masks' device (found once per change
    of the masks): zeroing them is index writes, where boolean-mask writes would each find their
    entries anew (a device sync each, some 280 a step at BERT-base depth)."""

    hidden: torch.Tensor  # dead hidden dims
    qk: list[torch.Tensor]  # per layer: the dead rows of Q and K (a dead head's rows included)
    vo: list[torch.Tensor]  # per layer: the dead rows of V, columns of O
    ffn: list[torch.Tensor]  # per layer: the dead FFN neurons
    heads: torch.Tensor  # the heads no layer keeps (a family's shared relative bias)

    @classmethod
    def of(cls, m: Masks) -> PrunedIndex:
        def dead(alive: torch.Tensor) -> torch.Tensor:
            return (~alive).nonzero().flatten()

        layers = range(m.heads.shape[0])
        return cls(
            hidden=dead(m.hidden),
            qk=[dead(m.qk_rows(i)) for i in layers],
            vo=[dead(m.vo_rows(i)) for i in layers],
            ffn=[dead(m.ffn[i]) for i in layers],
            heads=dead(m.heads.any(0)),
        )

    @property
    def nothing(self) -> bool:
        """True when nothing is pruned (no write to do)."""
        return all(t.numel() == 0 for t in (self.hidden, self.heads, *self.qk, *self.vo, *self.ffn))


@torch.no_grad()
def zero_pruned_weights(model: nn.Module, m: Masks, index: PrunedIndex | None = None) -> None:
    """Write zeros into every pruned weight, so the optimizer's momentum cannot revive it.
    `index`: `PrunedIndex.of(m)`, when the caller keeps it (found here otherwise)."""
    ix = index if index is not None else PrunedIndex.of(m)
    if ix.nothing:
        return
    h = ix.hidden
    arch = architecture_for(model)
    emb = arch.embeddings(model)
    for e in emb.tables():
        e.weight.index_fill_(1, h, 0)
    _zero_ln(emb.ln, h)
    for i in range(m.heads.shape[0]):
        t = arch.layer(model, i)
        qk, vo, f = ix.qk[i], ix.vo[i], ix.ffn[i]
        for lin, rows in ((t.q, qk), (t.k, qk), (t.v, vo)):
            _zero_rows(lin, rows)
            lin.weight.index_fill_(1, h, 0)
        t.o.weight.index_fill_(1, vo, 0)
        _zero_rows(t.o, h)
        _zero_rows(t.inter, f)
        t.inter.weight.index_fill_(1, h, 0)
        t.out.weight.index_fill_(1, f, 0)
        _zero_rows(t.out, h)
        _zero_ln(t.attn_ln, h)
        _zero_ln(t.out_ln, h)
    bias = arch.relative_bias(model)
    if bias is not None:  # a head no layer keeps
        bias.weight.index_fill_(1, ix.heads, 0)
    p = arch.pooler(model)
    if p is not None:
        _zero_rows(p, h)
        p.weight.index_fill_(1, h, 0)
    head = arch.mlm_head(model)
    if head is not None:
        _zero_rows(head.dense, h)
        head.dense.weight.index_fill_(1, h, 0)
        _zero_ln(head.ln, h)


def _zero_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    lin.weight.index_fill_(0, rows, 0)
    lin.bias.index_fill_(0, rows, 0)


def _zero_ln(ln: nn.LayerNorm, dead: torch.Tensor) -> None:
    ln.weight.index_fill_(0, dead, 0)
    ln.bias.index_fill_(0, dead, 0)


@dataclass(frozen=True)
class HostMasks:
    """What a training step branches on, read from the device once per change of the masks (in a
    step, reading a mask on the host would wait for the device)."""

    all_hidden: bool
    layers: tuple[bool, ...]  # False: chosen for removal
    widths: Shape  # Masks.widths with every layer counted (the fade is the host's to know)
    # the kept hidden dims' indices, on the masks' device (None: all kept): the gathered
    # LayerNorm of a bf16 forward (forward.masked_layer_norm)
    hidden_index: torch.Tensor | None = field(default=None, compare=False)

    @classmethod
    def of(cls, m: Masks) -> HostMasks:
        every = replace(m, fade=torch.ones_like(m.fade)).widths()
        all_hidden = bool(m.hidden.all())
        index = None if all_hidden else m.hidden.nonzero().flatten()
        return cls(all_hidden, tuple(bool(k) for k in m.layers.tolist()), every, index)


class MasksMemo:
    """`fn(masks)`, computed again only when the masks are other tensors: masks are replaced,
    never written in place (only `fade` is, and it is not part of the key)."""

    def __init__(self, fn: Callable[[Masks], Any]):
        self.fn, self.key, self.value = fn, None, None

    def __call__(self, m: Masks) -> Any:
        key = (m.hidden, m.heads, m.qk, m.vo, m.ffn, m.layers)
        if self.key is None or any(a is not b for a, b in zip(self.key, key, strict=True)):
            self.key, self.value = key, self.fn(m)
        return self.value


def spanned_shape(m: Masks | Any) -> Shape:
    """The widths spanned by per-unit tensors laid out as Masks' are (layers [L], hidden [D],
    heads [L, H], qk [L, H, d], ffn [L, F]): Masks, or progressive.Units of kept indices."""
    return Shape(
        layers=m.layers.numel(),
        hidden=m.hidden.numel(),
        heads=m.heads.shape[1],
        head_dim=m.qk.shape[2],
        ffn=m.ffn.shape[1],
    )
