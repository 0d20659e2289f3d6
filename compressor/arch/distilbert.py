"""DistilBERT: `transformer.layer.N` with `attention.{q,k,v,out}_lin`, `sa_layer_norm`,
`ffn.lin1/lin2`, `output_layer_norm`; config fields `n_layers`, `dim`, `n_heads`, `hidden_dim`,
`activation`. No token types, no pooler; positions 0..T-1 (learned, or fixed sinusoids with
`sinusoidal_pos_embds`: the table is still a weight of the checkpoint, and a slimmed model keeps
the kept columns of it, which is what the masked student computed with). The MLM head is
`vocab_transform` -> activation -> `vocab_layer_norm` -> `vocab_projector` (tied)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from compressor.arch.base import (
    Architecture,
    ConfigFields,
    EmbeddingTensors,
    LayerTensors,
    MlmHead,
)

if TYPE_CHECKING:
    from torch import nn


class DistilBertArchitecture(Architecture):
    family = "distilbert"
    model_types = ("distilbert",)
    fields = ConfigFields(
        layers="n_layers", hidden="dim", heads="n_heads", ffn="hidden_dim", activation="activation"
    )
    defaults: ClassVar[dict[str, int]] = {"n_layers": 6, "dim": 768, "n_heads": 12, "hidden_dim": 3072,
                "vocab_size": 30522, "max_position_embeddings": 512}  # fmt: skip
    layer_path = "transformer.layer"
    has_pooler = False
    mlm_head_prefixes = ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")

    def embeddings(self, model: nn.Module) -> EmbeddingTensors:
        e = self.base_model(model).embeddings
        return EmbeddingTensors(e.word_embeddings, e.position_embeddings, None, e.LayerNorm)

    def layer(self, model: nn.Module, i: int) -> LayerTensors:
        layer = self.layer_list(model)[i]
        a = layer.attention
        return LayerTensors(
            q=a.q_lin,
            k=a.k_lin,
            v=a.v_lin,
            o=a.out_lin,
            attn_ln=layer.sa_layer_norm,
            inter=layer.ffn.lin1,
            out=layer.ffn.lin2,
            out_ln=layer.output_layer_norm,
        )

    def mlm_head(self, model: nn.Module) -> MlmHead | None:
        if not hasattr(model, "vocab_projector"):
            return None
        p = model.vocab_projector
        return MlmHead(model.vocab_transform, model.activation, model.vocab_layer_norm, p, p.bias)


DISTILBERT = DistilBertArchitecture()
