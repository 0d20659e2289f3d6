"""Named access to the tensors of a transformers BERT model (BertModel or BertForMaskedLM).

One place knows the module paths, so masking, importance, forward and slimming share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class LayerTensors:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    attn_ln: nn.LayerNorm
    inter: nn.Linear
    out: nn.Linear
    out_ln: nn.LayerNorm


def base_model(model: nn.Module) -> nn.Module:
    """The BertModel inside a BertForMaskedLM, or the model itself."""
    return model.bert if hasattr(model, "bert") else model


def layer_tensors(model: nn.Module, i: int) -> LayerTensors:
    layer = base_model(model).encoder.layer[i]
    return LayerTensors(
        q=layer.attention.self.query,
        k=layer.attention.self.key,
        v=layer.attention.self.value,
        o=layer.attention.output.dense,
        attn_ln=layer.attention.output.LayerNorm,
        inter=layer.intermediate.dense,
        out=layer.output.dense,
        out_ln=layer.output.LayerNorm,
    )


def mlm_head(model: nn.Module) -> nn.Module | None:
    """`cls.predictions` of a BertForMaskedLM (transform + tied decoder), else None."""
    cls = getattr(model, "cls", None)
    return cls.predictions if cls is not None else None


def pooler(model: nn.Module) -> nn.Linear | None:
    p = getattr(base_model(model), "pooler", None)
    return p.dense if p is not None else None


def num_layers(model: nn.Module) -> int:
    return len(base_model(model).encoder.layer)


def student_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unique trainable tensors by name (a tied decoder appears once, as the word embeddings)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out
