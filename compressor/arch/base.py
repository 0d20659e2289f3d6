"""What every architecture adapter answers: where a family keeps each prunable tensor, what its
config calls each size, how its embeddings and attention differ from BERT's, and which
onnxruntime optimizer type fuses its graph.

The pruning maths (masks.py, importance.py, progressive.py, slim.py), the masked forward
(forward.py), the parameter count (shapes.py) and the export (deploy/export.py) ask an adapter;
nothing outside `compressor/arch/` names a family's modules or config fields.

Every family here is a post-LayerNorm encoder of the same block:

    a = LN_attn(x + O(attention(Q x, K x, V x) [+ bias]))     y = LN_out(a + W_out act(W_in a))

so one masked forward serves them all; an adapter says where Q, K, V, O, W_in, W_out and the two
LayerNorms live, how positions are numbered, and what (if anything) is added to the attention
scores. This module imports no deep-learning stack at load time (`compress recipe check` reads
configs through it without one).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class LayerTensors:
    """One encoder layer's prunable modules, by role."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    attn_ln: nn.LayerNorm
    inter: nn.Linear  # FFN in
    out: nn.Linear  # FFN out
    out_ln: nn.LayerNorm


@dataclass(frozen=True)
class EmbeddingTensors:
    word: nn.Embedding
    position: nn.Embedding
    token_type: nn.Embedding | None  # None: the family has no token types
    ln: nn.LayerNorm

    def tables(self) -> list[nn.Embedding]:
        """The embedding tables (each [rows, hidden])."""
        return [e for e in (self.word, self.position, self.token_type) if e is not None]


@dataclass(frozen=True)
class MlmHead:
    """A masked-LM head: dense -> act -> LayerNorm -> decoder (tied to the word embeddings) + bias."""

    dense: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    ln: nn.LayerNorm
    decoder: nn.Linear
    bias: nn.Parameter


@dataclass(frozen=True)
class ConfigFields:
    """What a family's config calls each size."""

    layers: str
    hidden: str
    heads: str
    ffn: str
    activation: str
    vocab: str = "vocab_size"
    positions: str = "max_position_embeddings"
    types: str | None = None  # None: no token types

    def sizes(self) -> dict[str, str]:
        """Config field per size kind, for the sizes every check reads."""
        out = {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
               "ffn": self.ffn, "vocab": self.vocab, "positions": self.positions}  # fmt: skip
        return out | ({"types": self.types} if self.types else {})


class Architecture:
    """One family of encoders. Subclasses fill in the class attributes and the module paths."""

    family: str  # the name users see ("bert", "roberta", ...)
    model_types: tuple[str, ...]  # config.model_type values this adapter serves
    fields: ConfigFields
    defaults: dict[str, int]  # the family config's defaults for the size fields a file may omit
    layer_path: str  # dotted path of the layer list inside the base model
    ort_model_type: str = "bert"  # onnxruntime.transformers.optimizer model_type
    shared_heads: bool = False  # one set of heads for every layer (a bias shared across layers)
    relative_buckets: int = 0  # rows of a relative-position bias table shared by every layer
    has_pooler: bool = True  # the bare encoder (AutoModel) has a pooler
    mlm_head_prefixes: tuple[str, ...] = ()  # checkpoint tensor names of the MLM head start so

    # ------------------------------------------------------------------ modules
    def base_model(self, model: nn.Module) -> nn.Module:
        """The bare encoder inside a model with a head, or the model itself."""
        return model.base_model

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return self.base_model(model).get_submodule(self.layer_path)

    def set_layer_list(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent, _, name = self.layer_path.rpartition(".")
        setattr(self.base_model(model).get_submodule(parent), name, layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layer_list(model))

    def embeddings(self, model: nn.Module) -> EmbeddingTensors:
        raise NotImplementedError

    def layer(self, model: nn.Module, i: int) -> LayerTensors:
        raise NotImplementedError

    def pooler(self, model: nn.Module) -> nn.Linear | None:
        p = getattr(self.base_model(model), "pooler", None)
        return p.dense if p is not None else None

    def mlm_head(self, model: nn.Module) -> MlmHead | None:
        raise NotImplementedError

    def relative_bias(self, model: nn.Module) -> nn.Embedding | None:
        """The relative-position bias table [buckets, heads] shared by every layer, if any."""
        return None

    # ------------------------------------------------------------------ forward pieces
    def activation(self, config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        from transformers.activations import ACT2FN

        return ACT2FN[getattr(config, self.fields.activation)]

    def position_ids(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Position of every token, [B, T] (or [T], the same for every row)."""
        import torch

        return torch.arange(input_ids.shape[1], device=input_ids.device)

    def max_tokens(self, cfg: Any) -> int:
        """The longest input the position table holds."""
        return self.sizes(cfg)["positions"]

    def attention_bias(self, model: nn.Module, seq: int, device: Any) -> torch.Tensor | None:
        """What the family adds to every layer's attention scores, [H, T, T], or None."""
        return None

    # ------------------------------------------------------------------ configs
    def sizes(self, cfg: Any) -> dict[str, int]:
        """The size fields (layers, hidden, heads, ffn, vocab, positions[, types]) of a config
        object or dict, the family's defaults for those it omits."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        return {
            kind: get(name, self.defaults.get(name)) for kind, name in self.fields.sizes().items()
        }

    def stock_config(self, config: Any, layers: int, hidden: int, heads: int, ffn: int) -> Any:
        """A copy of `config` at another shape: what a stock model of that shape is built from."""
        out = copy.deepcopy(config)
        f = self.fields
        for name, value in ((f.layers, layers), (f.hidden, hidden), (f.heads, heads), (f.ffn, ffn)):
            setattr(out, name, value)
        return out

    def check_slimmable(self, heads: list[list[int]]) -> None:
        """Raise ValueError when the kept heads (per kept layer, teacher indices) cannot be held
        by a stock model of this family."""
        if self.shared_heads and any(h != heads[0] for h in heads):
            raise ValueError(
                f"{self.family}: one relative-attention bias is shared by every layer, so every"
                f" layer must keep the same heads; this plan keeps {heads}"
            )


def config_get(cfg: Any, name: str, default: Any = None) -> Any:
    """A field of a config object or of a dict of its fields."""
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def student_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unique tensors by name (a tied decoder appears once, as the word embeddings)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out
