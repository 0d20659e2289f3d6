"""MPNet (all-mpnet-base-v2 and its kin): BERT's block with attention at `attention.attn.{q,k,v,o}`
and `attention.LayerNorm`, no token types, positions numbered from padding id 1 as RoBERTa's, and
one relative-position bias `encoder.relative_attention_bias` (32 buckets x heads) added to the
attention scores of EVERY layer.

How a slimmed MPNet stays stock: the bias table has one column per head and is shared by all
layers, so a stock MPNetModel can only hold a plan that keeps the same heads in every layer.
`shared_heads` makes head pruning global: a head's score is summed over the layers that stay
(importance.structure_scores) and every layer keeps the same heads; slimming keeps the bias
columns of those heads (and refuses a plan that differs per layer). Head dims, FFN neurons, hidden
dims and whole layers prune per layer as for BERT (the bias has no head-dim or hidden axis).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from compressor.arch.base import (
    Architecture,
    ConfigFields,
    EmbeddingTensors,
    LayerTensors,
    MlmHead,
)
from compressor.arch.bert import BERT_DEFAULTS
from compressor.arch.roberta import padded_positions

if TYPE_CHECKING:
    import torch
    from torch import nn

MPNET_PADDING_IDX = 1  # MPNetEmbeddings hard-codes it (not config.pad_token_id)
MPNET_BUCKETS = 32  # MPNetEncoder.compute_position_bias's num_buckets (the config's is not read)
MPNET_MAX_DISTANCE = 128


def relative_buckets(
    seq: int, num_buckets: int = MPNET_BUCKETS, max_distance: int = MPNET_MAX_DISTANCE
):
    """[T, T] bucket of every (query, key) pair: MPNet's (T5's bidirectional) bucketing."""
    import torch

    pos = torch.arange(seq)
    n = -(pos[None, :] - pos[:, None])  # -(key - query)
    half = num_buckets // 2
    ret = (n < 0).long() * half
    n = n.abs()
    max_exact = half // 2
    large = (
        max_exact
        + (
            torch.log(n.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (half - max_exact)
        ).long()
    )
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return ret + torch.where(n < max_exact, n, large)


class MPNetArchitecture(Architecture):
    family = "mpnet"
    model_types = ("mpnet",)
    fields = ConfigFields(
        layers="num_hidden_layers",
        hidden="hidden_size",
        heads="num_attention_heads",
        ffn="intermediate_size",
        activation="hidden_act",
    )
    defaults: ClassVar[dict[str, int]] = {
        k: v for k, v in BERT_DEFAULTS.items() if k != "type_vocab_size"
    }
    layer_path = "encoder.layer"
    mlm_head_prefixes = ("lm_head.",)
    shared_heads = True
    relative_buckets = MPNET_BUCKETS

    def embeddings(self, model: nn.Module) -> EmbeddingTensors:
        e = self.base_model(model).embeddings
        return EmbeddingTensors(e.word_embeddings, e.position_embeddings, None, e.LayerNorm)

    def layer(self, model: nn.Module, i: int) -> LayerTensors:
        layer = self.layer_list(model)[i]
        a = layer.attention
        return LayerTensors(
            q=a.attn.q,
            k=a.attn.k,
            v=a.attn.v,
            o=a.attn.o,
            attn_ln=a.LayerNorm,
            inter=layer.intermediate.dense,
            out=layer.output.dense,
            out_ln=layer.output.LayerNorm,
        )

    def mlm_head(self, model: nn.Module) -> MlmHead | None:
        from transformers.activations import gelu

        h = getattr(model, "lm_head", None)
        if h is None:
            return None
        return MlmHead(h.dense, gelu, h.layer_norm, h.decoder, h.bias)

    def relative_bias(self, model: nn.Module) -> nn.Embedding | None:
        return self.base_model(model).encoder.relative_attention_bias

    def max_tokens(self, cfg: Any) -> int:
        """Rows 0 and 1 (the padding id) are never a real token's (514 rows hold 512 tokens)."""
        return self.sizes(cfg)["positions"] - MPNET_PADDING_IDX - 1

    def position_ids(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return padded_positions(input_ids, MPNET_PADDING_IDX)

    def attention_bias(self, model: nn.Module, seq: int, device: Any) -> torch.Tensor | None:
        table = self.relative_bias(model).weight  # [buckets, H]
        return table[relative_buckets(seq).to(device)].permute(2, 0, 1)  # [H, T, T]


MPNET = MPNetArchitecture()
