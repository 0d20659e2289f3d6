"""Physical slimming: the pruning plan (kept indices, as data) -> a dense, stock model of the
teacher's family (its adapter in compressor/arch/ says where each tensor goes).

Weights and config change together. Q is scaled by sqrt(new_head_dim / old_head_dim), so the
slimmed model's 1/sqrt(new_head_dim) attention scale reproduces the masked student's scores.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.arch import architecture_for
from compressor.prune.masks import Masks
from compressor.shapes import Shape


@dataclass(frozen=True)
class PrunePlan:
    """Kept structures, by the teacher's indices. Replayable and diffable (plan.json)."""

    teacher_shape: Shape
    layers: list[int]  # kept teacher layers, in order
    hidden: list[int]
    heads: list[list[int]]  # per kept layer
    qk_dims: list[list[list[int]]]  # per kept layer, per kept head
    vo_dims: list[list[list[int]]]
    ffn: list[list[int]]  # per kept layer

    @property
    def shape(self) -> Shape:
        return Shape(
            layers=len(self.layers),
            hidden=len(self.hidden),
            heads=len(self.heads[0]),
            head_dim=len(self.qk_dims[0][0]),
            ffn=len(self.ffn[0]),
        )

    @classmethod
    def from_masks(cls, m: Masks, teacher_shape: Shape) -> PrunePlan:
        def idx(t: torch.Tensor) -> list[int]:
            return t.nonzero().flatten().tolist()

        fading = (~m.layers & (m.fade != 0)).nonzero().flatten().tolist()
        if fading:
            raise ValueError(f"layers {fading} are still fading out (fade > 0): cannot slim yet")
        layers = idx(m.layers)
        heads = [idx(m.heads[i]) for i in layers]
        plan = cls(
            teacher_shape=teacher_shape,
            layers=layers,
            hidden=idx(m.hidden),
            heads=heads,
            qk_dims=[[idx(m.qk[i, h]) for h in hs] for i, hs in zip(layers, heads, strict=True)],
            vo_dims=[[idx(m.vo[i, h]) for h in hs] for i, hs in zip(layers, heads, strict=True)],
            ffn=[idx(m.ffn[i]) for i in layers],
        )
        plan.check_uniform()
        return plan

    def check_uniform(self) -> None:
        """A stock config needs the same widths everywhere and hidden == heads * head_dim."""
        s = self.shape
        widths = (
            {len(h) for h in self.heads} == {s.heads}
            and {len(f) for f in self.ffn} == {s.ffn}
            and {len(d) for layer in self.qk_dims for d in layer} == {s.head_dim}
            and {len(d) for layer in self.vo_dims for d in layer} == {s.head_dim}
        )
        if not widths or s.hidden != s.heads * s.head_dim:
            raise ValueError(f"plan is not a stock encoder shape: {s}")

    def to_json(self) -> str:
        d = asdict(self)
        d["shape"] = self.shape.to_dict()
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        d = json.loads(text)
        d.pop("shape", None)
        d["teacher_shape"] = Shape(**d["teacher_shape"])
        return cls(**d)


@torch.no_grad()
def slim(model: nn.Module, plan: PrunePlan, score_head_dim: int | None = None) -> nn.Module:
    """A new, dense model of the plan's shape with the kept weights of `model` (whose shape is the
    plan's `teacher_shape`). `score_head_dim`: the head size of `model`'s attention scale, when it
    is not its own (a progressively slimmed student keeps its teacher's)."""
    s, t_shape = plan.shape, plan.teacher_shape
    arch = architecture_for(model)
    arch.check_slimmable(plan.heads)
    cfg = arch.stock_config(model.config, s.layers, s.hidden, s.heads, s.ffn)
    out = type(model)(cfg).to(next(model.parameters()).dtype).eval()
    h = torch.tensor(plan.hidden)
    q_scale = math.sqrt(s.head_dim / (score_head_dim or t_shape.head_dim))

    src, dst = arch.embeddings(model), arch.embeddings(out)
    for a_e, b_e in zip(src.tables(), dst.tables(), strict=True):
        b_e.weight.copy_(a_e.weight[:, h])
    _copy_ln(dst.ln, src.ln, h)

    for new_i, old_i in enumerate(plan.layers):
        a, b = arch.layer(model, old_i), arch.layer(out, new_i)
        qk = _rows(plan.heads[new_i], plan.qk_dims[new_i], t_shape.head_dim)
        vo = _rows(plan.heads[new_i], plan.vo_dims[new_i], t_shape.head_dim)
        f = torch.tensor(plan.ffn[new_i])
        _copy_linear(b.q, a.q, qk, h, scale=q_scale)
        _copy_linear(b.k, a.k, qk, h)
        _copy_linear(b.v, a.v, vo, h)
        _copy_linear(b.o, a.o, h, vo)
        _copy_linear(b.inter, a.inter, f, h)
        _copy_linear(b.out, a.out, h, f)
        _copy_ln(b.attn_ln, a.attn_ln, h)
        _copy_ln(b.out_ln, a.out_ln, h)

    table = arch.relative_bias(model)
    if table is not None:  # the same heads in every layer (check_slimmable)
        arch.relative_bias(out).weight.copy_(table.weight[:, plan.heads[0]])
    if arch.pooler(model) is not None and arch.pooler(out) is not None:
        _copy_linear(arch.pooler(out), arch.pooler(model), h, h)
    head = arch.mlm_head(model)
    if head is not None:
        new_head = arch.mlm_head(out)
        _copy_linear(new_head.dense, head.dense, h, h)
        _copy_ln(new_head.ln, head.ln, h)
        new_head.bias.copy_(head.bias)
        out.tie_weights()
    return out


def _rows(heads: list[int], dims: list[list[int]], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + e for h, ds in zip(heads, dims, strict=True) for e in ds])


def _copy_linear(
    dst: nn.Linear, src: nn.Linear, rows: torch.Tensor, cols: torch.Tensor, scale: float = 1.0
) -> None:
    dst.weight.copy_(src.weight[rows][:, cols] * scale)
    dst.bias.copy_(src.bias[rows] * scale)


def _copy_ln(dst: nn.LayerNorm, src: nn.LayerNorm, keep: torch.Tensor) -> None:
    dst.weight.copy_(src.weight[keep])
    dst.bias.copy_(src.bias[keep])


def save_slim_model(
    model: nn.Module, tokenizer: Any, st_files: dict[str, Any], out_dir: Path
) -> None:
    """Save weights (safetensors), config, tokenizer and, when the teacher had them, the
    sentence-transformers files with the pooling width updated."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    for rel, content in st_files.items():
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel == "1_Pooling/config.json":
            hidden = architecture_for(model).sizes(model.config)["hidden"]
            content = {**content, "word_embedding_dimension": hidden}
        target.write_text(json.dumps(content, indent=2))
