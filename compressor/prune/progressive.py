"""Progressive slimming: physically remove, during training, the structures the masks have pruned,
so that late training costs what a small model costs (`pruning.progressive_slim`).

Masks only ever shrink and a layer chosen for removal is removed once its fade is 0, so a pruned
structure never returns: it can be cut out of every tensor that holds it. One cut (`Units`, the
kept indices of the current student) is applied alike to the student's parameters, the hidden
maps' input columns, AdamW's moments, the importance state and the base the checkpoints are
stored against; the masks are re-indexed to the kept units (all alive). `Units` composed over the
cuts maps every current unit back to the teacher's indices (plan.json, the final slim, resume).

The student keeps the teacher's attention scale (its config is left as the teacher's; the final
`slim` folds the new scale into Q), and the masked forward reads its widths from the masks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from compressor.arch import LAYER_KEY, architecture_for
from compressor.prune.importance import EmaState, structure_scores
from compressor.prune.masks import Masks, spanned_shape
from compressor.shapes import Shape


@dataclass(frozen=True)
class Units:
    """Kept indices, one tensor per structure kind (long): into the teacher (composed over the
    cuts) or into the current student (one cut)."""

    layers: torch.Tensor  # [L']
    hidden: torch.Tensor  # [D']
    heads: torch.Tensor  # [L', H']
    qk: torch.Tensor  # [L', H', dh']
    vo: torch.Tensor  # [L', H', dh']
    ffn: torch.Tensor  # [L', I']

    @classmethod
    def identity(cls, s: Shape) -> Units:
        def ar(n: int, *lead: int) -> torch.Tensor:
            return torch.arange(n).expand(*lead, n).clone()

        return cls(ar(s.layers), ar(s.hidden), ar(s.heads, s.layers),
                   ar(s.head_dim, s.layers, s.heads), ar(s.head_dim, s.layers, s.heads),
                   ar(s.ffn, s.layers))  # fmt: skip

    @classmethod
    def kept(cls, m: Masks) -> Units:
        """What survives a cut under masks `m`: every alive structure, every layer but those
        chosen for removal whose fade has reached 0. Widths are uniform (masks.py)."""
        m = m.to("cpu")
        layers = (m.layers | (m.fade != 0)).nonzero().flatten()

        def idx(alive: torch.Tensor) -> torch.Tensor:
            """Indices of the alive entries along the last dim (same count in every row)."""
            counts = alive.sum(-1)
            n = int(counts.flatten()[0]) if alive.numel() else 0
            if not bool((counts == n).all()):
                raise ValueError(
                    f"widths are not uniform ({sorted(set(counts.flatten().tolist()))})"
                )
            order = torch.argsort((~alive).to(torch.int8), dim=-1, stable=True)
            return order[..., :n].sort(-1).values

        heads = idx(m.heads[layers])
        pick = heads[..., None].expand(-1, -1, m.qk.shape[2])
        qk = idx(m.qk[layers].gather(1, pick))
        vo = idx(m.vo[layers].gather(1, pick))
        return cls(layers, m.hidden.nonzero().flatten(), heads, qk, vo, idx(m.ffn[layers]))

    def shape(self) -> Shape:
        return spanned_shape(self)

    def then(self, cut: Units) -> Units:
        """These units after a further `cut` (its indices are into these units)."""
        layers = self.layers[cut.layers]
        heads = self.heads[cut.layers].gather(1, cut.heads)
        h3 = cut.heads[..., None].expand(-1, -1, self.qk.shape[2])
        qk = self.qk[cut.layers].gather(1, h3).gather(2, cut.qk)
        vo = self.vo[cut.layers].gather(1, h3).gather(2, cut.vo)
        ffn = self.ffn[cut.layers].gather(1, cut.ffn)
        return Units(layers, self.hidden[cut.hidden], heads, qk, vo, ffn)

    def is_identity_of(self, s: Shape) -> bool:
        return self.shape() == s and all(
            torch.equal(getattr(self, f.name), getattr(Units.identity(s), f.name))
            for f in fields(self)
        )

    def qk_rows(self, i: int, head_dim: int) -> torch.Tensor:
        """Rows of Q and K of kept layer i, as indices into a layer of head size `head_dim`."""
        return (self.heads[i][:, None] * head_dim + self.qk[i]).flatten()

    def vo_rows(self, i: int, head_dim: int) -> torch.Tensor:
        return (self.heads[i][:, None] * head_dim + self.vo[i]).flatten()

    def in_teacher(self, m: Masks, full: Shape) -> Masks:
        """Masks over the current units (these units are the teacher's indices) -> the same masks
        at the teacher's shape: a removed structure is dead, a removed layer has fade 0."""
        m = m.to("cpu")
        out = Masks.full(full)
        hidden = torch.zeros(full.hidden, dtype=torch.bool)
        hidden[self.hidden] = m.hidden
        layers = torch.zeros(full.layers, dtype=torch.bool)
        layers[self.layers] = m.layers
        fade = torch.zeros(full.layers)
        fade[self.layers] = m.fade.detach().float()
        heads = torch.zeros_like(out.heads)
        qk, vo = torch.zeros_like(out.qk), torch.zeros_like(out.vo)
        ffn = torch.zeros_like(out.ffn)
        for i, t in enumerate(self.layers.tolist()):
            heads[t, self.heads[i]] = m.heads[i]
            ffn[t, self.ffn[i]] = m.ffn[i]
            for j, h in enumerate(self.heads[i].tolist()):
                qk[t, h, self.qk[i, j]] = m.qk[i, j]
                vo[t, h, self.vo[i, j]] = m.vo[i, j]
        return Masks(hidden=hidden, heads=heads, qk=qk, vo=vo, ffn=ffn, layers=layers, fade=fade)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).clone() for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> Units:
        return cls(**{f.name: d[f.name].long().cpu() for f in fields(cls)})


def cut_masks(m: Masks, cut: Units) -> Masks:
    """The masks re-indexed to the kept units: what survives is alive, as it was."""
    layers = cut.layers.to(m.hidden.device)
    c = {f.name: getattr(cut, f.name).to(m.hidden.device) for f in fields(cut)}
    heads = m.heads[layers].gather(1, c["heads"])
    h3 = c["heads"][..., None].expand(-1, -1, m.qk.shape[2])
    return Masks(
        hidden=m.hidden[c["hidden"]],
        heads=heads,
        qk=m.qk[layers].gather(1, h3).gather(2, c["qk"]),
        vo=m.vo[layers].gather(1, h3).gather(2, c["vo"]),
        ffn=m.ffn[layers].gather(1, c["ffn"]),
        layers=m.layers[layers],
        fade=m.fade[layers],
    )


# ---------------------------------------------------------------------------- tensors


Index = tuple[torch.Tensor | None, torch.Tensor | None]  # kept rows, kept columns (None: all)


def tensor_cuts(model: nn.Module, cut: Units, head_dim: int) -> dict[str, Index]:
    """Per parameter name of `model` (tied names included), the rows and columns a cut keeps:
    the coupling of masks.py, as indices. Layers the cut drops are absent."""
    h = cut.hidden
    by_id: dict[int, Index] = {}
    arch = architecture_for(model)
    emb = arch.embeddings(model)
    for e in emb.tables():
        by_id[id(e.weight)] = (None, h)

    def ln(mod: nn.LayerNorm) -> None:
        by_id[id(mod.weight)], by_id[id(mod.bias)] = (h, None), (h, None)

    def lin(mod: nn.Linear, rows, cols) -> None:
        by_id[id(mod.weight)] = (rows, cols)
        if mod.bias is not None:
            by_id[id(mod.bias)] = (rows, None)

    ln(emb.ln)
    for new_i, old_i in enumerate(cut.layers.tolist()):
        t = arch.layer(model, old_i)
        qk, vo, f = cut.qk_rows(new_i, head_dim), cut.vo_rows(new_i, head_dim), cut.ffn[new_i]
        lin(t.q, qk, h)
        lin(t.k, qk, h)
        lin(t.v, vo, h)
        lin(t.o, h, vo)
        lin(t.inter, f, h)
        lin(t.out, h, f)
        ln(t.attn_ln)
        ln(t.out_ln)
    table = arch.relative_bias(model)
    if table is not None:  # one set of heads for every layer (arch.check_slimmable)
        arch.check_slimmable(cut.heads.tolist())
        by_id[id(table.weight)] = (None, cut.heads[0])
    p = arch.pooler(model)
    if p is not None:
        lin(p, h, h)
    head = arch.mlm_head(model)
    if head is not None:
        lin(head.dense, h, h)
        ln(head.ln)
        by_id[id(head.decoder.weight)] = (None, h)  # tied to the word embeddings
        by_id[id(head.bias)] = (None, None)
    return {
        n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in by_id
    }


def cut_tensor(t: torch.Tensor, index: Index) -> torch.Tensor:
    rows, cols = index
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if cols is not None:
        t = t.index_select(1, cols.to(t.device))
    return t.contiguous()


def renamed(name: str, cut: Units) -> str | None:
    """A student tensor's name after the cut (its layer renumbered); None: its layer is dropped."""
    match = LAYER_KEY.search(name)
    if match is None:
        return name
    old = int(match.group(2))
    kept = cut.layers.tolist()
    if old not in kept:
        return None
    start, end = match.span(2)
    return name[:start] + str(kept.index(old)) + name[end:]


def cut_named(
    tensors: dict[str, torch.Tensor], cuts: dict[str, Index], cut: Units
) -> dict[str, torch.Tensor]:
    """A dict of tensors named like the student's state (parameters cut, buffers kept, dropped
    layers left out), renamed as the student is after the cut."""
    out = {}
    for n, t in tensors.items():
        new = renamed(n, cut)
        if new is not None:
            out[new] = cut_tensor(t, cuts[n]) if n in cuts else t
    return out


@torch.no_grad()
def cut_student(model: nn.Module, cut: Units, head_dim: int) -> None:
    """Cut `model` in place: every parameter replaced by its kept rows and columns, the dropped
    layers removed, the tied decoder tied again."""
    cuts = tensor_cuts(model, cut, head_dim)
    done: dict[int, nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if renamed(name, cut) is None:
            continue  # a dropped layer's
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if id(p) not in done:
            new = nn.Parameter(cut_tensor(p.detach(), cuts[name]), requires_grad=p.requires_grad)
            done[id(p)] = new
        setattr(mod, attr, done[id(p)])
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.Embedding):
            mod.embedding_dim = mod.weight.shape[1]
    arch = architecture_for(model)
    layers = arch.layer_list(model)
    arch.set_layer_list(model, nn.ModuleList(layers[i] for i in cut.layers.tolist()))


@torch.no_grad()
def cut_maps_inputs(maps: nn.Module, hidden: torch.Tensor) -> None:
    """The hidden maps read the student's kept hidden dims only (their outputs stay the
    teacher's width)."""
    for m in maps.maps:
        m.weight = nn.Parameter(cut_tensor(m.weight.detach(), (None, hidden)))
        m.in_features = m.weight.shape[1]


def cut_kinds(scores: dict[str, torch.Tensor], cut: Units) -> dict[str, torch.Tensor]:
    """Structure scores (hidden [D], heads [L, H], qk/vo [L, H, dh], ffn [L, I]) of the kept
    structures."""
    dev = scores["hidden"].device
    c = {f.name: getattr(cut, f.name).to(dev) for f in fields(cut)}
    h3 = c["heads"][..., None].expand(-1, -1, scores["qk"].shape[2])
    return {
        "hidden": scores["hidden"][c["hidden"]],
        "heads": scores["heads"][c["layers"]].gather(1, c["heads"]),
        "qk": scores["qk"][c["layers"]].gather(1, h3).gather(2, c["qk"]),
        "vo": scores["vo"][c["layers"]].gather(1, h3).gather(2, c["vo"]),
        "ffn": scores["ffn"][c["layers"]].gather(1, c["ffn"]),
    }


def outside(t: torch.Tensor, index: Index | None) -> torch.Tensor:
    """`t` with its kept entries zeroed: the part a cut removes (all of it when `index` is None,
    a dropped layer)."""
    if index is None:
        return t.clone()
    rows, cols = index
    kept = torch.zeros_like(t, dtype=torch.bool)
    r = torch.arange(t.shape[0], device=t.device) if rows is None else rows.to(t.device)
    if t.ndim == 1:
        kept[r] = True
    else:
        c = torch.arange(t.shape[1], device=t.device) if cols is None else cols.to(t.device)
        kept[r[:, None], c] = True
    return t.masked_fill(kept, 0)


def removed_sums(
    model: nn.Module,
    entries: dict[str, torch.Tensor],
    cuts: dict[str, Index],
    head_dim: int,
    layers_kept: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The structure scores (importance.structure_scores) of the entries a cut removes."""
    names = {n for n, _ in model.named_parameters()}
    part = {n: outside(t, cuts.get(n)) for n, t in entries.items() if n in names}
    return structure_scores(model, part, head_dim, layers_kept)


@torch.no_grad()
def cut_importance(
    state: EmaState,
    model: nn.Module,
    cut: Units,
    head_dim: int,
    layers_kept: torch.Tensor,
    fade_key: str,
) -> EmaState:
    """The EMA state after a cut (before `cut_student` runs on `model`): the kept entries' EMA,
    and the removed entries' sums added to the structures they crossed."""
    cuts = tensor_cuts(model, cut, head_dim)
    i, u = state.i_bar, state.u_bar
    quantities = {
        "i": {n: i[n] for n in i},
        "iu": {n: i[n] * u[n] for n in i},
        "ii": {n: i[n] * i[n] for n in i},
    }
    removed = {}
    for q, entries in quantities.items():
        total = removed_sums(model, entries, cuts, head_dim, layers_kept)
        if state.removed:
            total = {k: v + state.removed[q][k] for k, v in total.items()}
        removed[q] = cut_kinds(total, cut)

    def kept(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = cut_named({n: t for n, t in d.items() if n != fade_key}, cuts, cut)
        out[fade_key] = d[fade_key][cut.layers.to(d[fade_key].device)]
        return out

    return EmaState(kept(i), kept(u), state.steps, removed)
