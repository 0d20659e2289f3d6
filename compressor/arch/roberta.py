"""RoBERTa, XLM-RoBERTa and CamemBERT: BERT's modules under another name, positions numbered
from the padding id.

A token's position is padding_idx + 1 + (its index among the non-padding tokens), and a padding
token sits at padding_idx (transformers' `create_position_ids_from_input_ids`), where padding_idx
is the config's `pad_token_id` (1 in the released checkpoints): position rows 0 and 1 are never
used by a real token, which is why `max_position_embeddings` is 514 for 512 tokens. One token
type (`type_vocab_size` 1). The MLM head is `lm_head` (dense, gelu, layer_norm, tied decoder).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compressor.arch.base import MlmHead, config_get
from compressor.arch.bert import BertArchitecture

if TYPE_CHECKING:
    import torch
    from torch import nn


def padded_positions(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """fairseq's positions: padding_idx + 1, + 2, ... over the real tokens, padding_idx at pads."""
    real = input_ids.ne(padding_idx).long()
    return real.cumsum(1) * real + padding_idx


class RobertaArchitecture(BertArchitecture):
    family = "roberta"
    model_types = ("roberta", "xlm-roberta", "camembert")
    mlm_head_prefixes = ("lm_head.",)

    def max_tokens(self, cfg: Any) -> int:
        """Rows 0..padding_idx are never a real token's (514 rows hold 512 tokens)."""
        return self.sizes(cfg)["positions"] - config_get(cfg, "pad_token_id", 1) - 1

    def position_ids(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return padded_positions(input_ids, self.base_model(model).embeddings.padding_idx)

    def mlm_head(self, model: nn.Module) -> MlmHead | None:
        from transformers.activations import gelu

        h = getattr(model, "lm_head", None)
        if h is None:
            return None
        return MlmHead(h.dense, gelu, h.layer_norm, h.decoder, h.bias)


ROBERTA = RobertaArchitecture()
