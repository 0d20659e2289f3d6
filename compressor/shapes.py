"""Shapes of the supported encoders and the closed-form parameter count of each."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from compressor.arch import architecture_for


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    head_dim: int
    ffn: int

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    def label(self) -> str:
        return f"{self.layers}L-{self.hidden}H-{self.heads}A-{self.ffn}I"

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def of_config(cls, cfg: Any) -> Shape:
        """Read a Shape from a transformers config (or a dict of its fields) of any supported
        family (its adapter names the fields)."""
        n = architecture_for(cfg).sizes(cfg)
        return cls(n["layers"], n["hidden"], n["heads"], n["hidden"] // n["heads"], n["ffn"])


def config_has_mlm_head(cfg: dict) -> bool:
    """Whether a config (a dict of its fields) names an architecture with a masked-LM head."""
    return any("MaskedLM" in a or "PreTraining" in a for a in cfg.get("architectures") or [])


@dataclass(frozen=True)
class Vocab:
    """The sizes that do not change under pruning."""

    vocab: int = 30522
    positions: int = 512
    types: int = 2  # token types (0: the family has none)
    relative_buckets: int = 0  # rows of a relative-position bias shared by all layers (MPNet)

    @classmethod
    def of_config(cls, cfg: Any) -> Vocab:
        """The fixed sizes of a config (object or dict) of any supported family."""
        arch = architecture_for(cfg)
        n = arch.sizes(cfg)
        return cls(n["vocab"], n["positions"], n.get("types", 0), arch.relative_buckets)


def param_count(s: Shape, v: Vocab, pooler: bool = True, mlm_head: bool = False) -> int:
    """Parameters of an encoder (+ MLM head) of this shape (tied decoder counted once). Every
    supported family has BERT's layer; they differ in token types, the pooler and a shared
    relative-position bias table (one column per head)."""
    d, a, i = s.hidden, s.attn_width, s.ffn
    embeddings = (v.vocab + v.positions + v.types) * d + 2 * d + v.relative_buckets * s.heads
    attention = 3 * (d * a + a) + (a * d + d) + 2 * d
    ffn = (d * i + i) + (i * d + d) + 2 * d
    total = embeddings + s.layers * (attention + ffn)
    if pooler:
        total += d * d + d
    if mlm_head:
        total += d * d + d + 2 * d + v.vocab  # transform dense + LayerNorm + decoder bias
    return total
