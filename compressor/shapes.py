"""Shapes of BERT-style encoders and the closed-form parameter count of each."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
    def of_config(cls, cfg) -> Shape:
        """Read a Shape from a transformers BertConfig (or a dict of its fields)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        return cls(
            get("num_hidden_layers"), hidden, heads, hidden // heads, get("intermediate_size")
        )


def config_has_mlm_head(cfg: dict) -> bool:
    """Whether a config (a dict of BertConfig fields) names an architecture with a masked-LM head."""
    return any("MaskedLM" in a or "PreTraining" in a for a in cfg.get("architectures") or [])


@dataclass(frozen=True)
class Vocab:
    """The sizes that do not change under pruning."""

    vocab: int = 30522
    positions: int = 512
    types: int = 2


def param_count(s: Shape, v: Vocab, pooler: bool = True, mlm_head: bool = False) -> int:
    """Parameters of a BertModel / BertForMaskedLM of this shape (tied decoder counted once)."""
    d, a, i = s.hidden, s.attn_width, s.ffn
    embeddings = (v.vocab + v.positions + v.types) * d + 2 * d
    attention = 3 * (d * a + a) + (a * d + d) + 2 * d
    ffn = (d * i + i) + (i * d + d) + 2 * d
    total = embeddings + s.layers * (attention + ffn)
    if pooler:
        total += d * d + d
    if mlm_head:
        total += d * d + d + 2 * d + v.vocab  # transform dense + LayerNorm + decoder bias
    return total
