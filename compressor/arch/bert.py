"""BERT (BertModel, BertForMaskedLM; also MiniLM, bge, e5, gte, which are BERTs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressor.arch.base import (
    Architecture,
    ConfigFields,
    EmbeddingTensors,
    LayerTensors,
    MlmHead,
)

if TYPE_CHECKING:
    from torch import nn

BERT_DEFAULTS = {
    "num_hidden_layers": 12,
    "hidden_size": 768,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}


class BertArchitecture(Architecture):
    """Post-LN BERT block; absolute positions 0..T-1 and token types."""

    family = "bert"
    model_types = ("bert",)
    fields = ConfigFields(
        layers="num_hidden_layers",
        hidden="hidden_size",
        heads="num_attention_heads",
        ffn="intermediate_size",
        activation="hidden_act",
        types="type_vocab_size",
    )
    defaults = BERT_DEFAULTS
    layer_path = "encoder.layer"
    mlm_head_prefixes = ("cls.predictions.",)

    def embeddings(self, model: nn.Module) -> EmbeddingTensors:
        e = self.base_model(model).embeddings
        return EmbeddingTensors(
            e.word_embeddings, e.position_embeddings, e.token_type_embeddings, e.LayerNorm
        )

    def layer(self, model: nn.Module, i: int) -> LayerTensors:
        layer = self.layer_list(model)[i]
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

    def mlm_head(self, model: nn.Module) -> MlmHead | None:
        cls = getattr(model, "cls", None)
        if cls is None:
            return None
        p = cls.predictions
        t = p.transform
        return MlmHead(t.dense, t.transform_act_fn, t.LayerNorm, p.decoder, p.bias)


BERT = BertArchitecture()
