"""A functional forward pass of an encoder under pruning masks (any family compressor/arch/ knows;
its adapter says where each tensor is, how positions are numbered and what is added to the
attention scores).

It computes exactly what the physically slimmed model will compute:
- pruned Q/K/V rows, FFN neurons and hidden dims are zeroed in the activations;
- LayerNorm statistics are taken over the kept hidden dims only;
- attention scores keep the teacher's 1/sqrt(head_dim) (slimming folds the new scale into Q);
- a layer being removed is faded to the identity: out = x + fade * (layer(x) - x).
Under masks the head count and size are the masks' (a progressively slimmed student, whose
config stays the teacher's, is narrower than its config says).
With `masks=None` it is the family's stock forward (eval mode, no dropout): tests hold it to the
transformers implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.arch import architecture_for
from compressor.prune.masks import HostMasks, Masks


@dataclass
class EncoderOutput:
    hidden_states: list[torch.Tensor]  # embeddings output, then each layer: [B, T, D]
    attentions: list[torch.Tensor]  # each layer: [B, H, T, T] probabilities
    logits: torch.Tensor | None  # MLM logits [B, T, V] when asked and the model has a head


def masked_layer_norm(
    x: torch.Tensor,
    ln: nn.LayerNorm,
    keep: torch.Tensor | None,
    all_kept: bool,
    kept_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the kept dims only; pruned dims come out as exact zeros. With `kept_index`
    (the kept dims' indices: what `encode` passes under bf16 autocast) it is the slimmed model's
    own computation: one fused layer_norm of the kept dims gathered, scattered back into zeros
    (three passes, one [.., n] tensor kept for the backward). Without, the composite over the
    mask (about eight passes, two [.., D] tensors kept; in fp32 bit for bit what it always
    gave). Both are the same function; they round differently (tests/test_memory_traffic.py)."""
    if keep is None or all_kept:
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    if kept_index is not None:
        n = kept_index.numel()
        w, b = ln.weight.index_select(0, kept_index), ln.bias.index_select(0, kept_index)
        y = F.layer_norm(x.index_select(-1, kept_index), (n,), w, b, ln.eps)
        return x.new_zeros(x.shape, dtype=y.dtype).index_copy_(-1, kept_index, y)
    m = keep.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum(-1, keepdim=True) / n
    centred = (x - mean) * m
    var = (centred * centred).sum(-1, keepdim=True) / n
    return centred * torch.rsqrt(var + ln.eps) * (ln.weight * m) + ln.bias * m


@dataclass(frozen=True)
class Masking:
    """What one forward does to every activation under masks: zero the pruned hidden dims,
    LayerNorm over the kept ones, dropout (0: none). With `masks=None` all three are the stock
    operations."""

    masks: Masks | None
    host: HostMasks | None
    dropout: float
    hmask: torch.Tensor | None  # the kept hidden dims in the activations' dtype; None: all kept
    gathered: torch.Tensor | None  # their indices, for the gathered LayerNorm under autocast

    @classmethod
    def of(cls, masks: Masks | None, host: HostMasks | None, dtype: torch.dtype,
           device: torch.device, dropout: float) -> Masking:  # fmt: skip
        if masks is None:
            return cls(None, None, dropout, None, None)
        host = host if host is not None else HostMasks.of(masks)
        if host.all_hidden:
            return cls(masks, host, dropout, None, None)
        # bf16: the gathered LayerNorm (masked_layer_norm); fp32: the composite, as it always was
        autocast = torch.is_autocast_enabled(device.type)
        gathered = host.hidden_index if autocast else None
        return cls(masks, host, dropout, masks.hidden.to(dtype), gathered)

    def norm(self, x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        hid = None if self.masks is None else self.masks.hidden
        return masked_layer_norm(x, ln, hid, self.hmask is None, self.gathered)

    def keep_hidden(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.hmask is None else x * self.hmask

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout) if self.dropout else x


@dataclass(frozen=True)
class HeadShape:
    n_heads: int
    head_dim: int
    scale: float  # the config's 1/sqrt(head_dim): a progressively slimmed student keeps it


def encode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    masks: Masks | None = None,
    token_type_ids: torch.Tensor | None = None,
    with_logits: bool = False,
    dropout: float = 0.0,
    logits_at: torch.Tensor | None = None,
    host: HostMasks | None = None,
) -> EncoderOutput:
    """The encoder's outputs under `masks` (module docstring). With `logits_at` (flat positions
    into [B x T]) the MLM head runs at those positions only and the logits are [N, V] (the rows of
    the [B, T, V] logits at them, in that order); without, at every position. `host`:
    `HostMasks.of(masks)`, kept by a caller that runs many steps (read here otherwise)."""
    arch = architecture_for(model)
    shape = head_shape(arch.sizes(model.config), masks)
    emb = arch.embeddings(model)
    m = Masking.of(masks, host, emb.word.weight.dtype, input_ids.device, dropout)

    x = embed(arch, model, input_ids, token_type_ids, m)
    bias = attention_bias(arch, model, attention_mask, x.dtype)
    act = arch.activation(model.config)
    hidden_states, attentions = [x], []
    for i in range(arch.num_layers(model)):
        x, probs = layer_forward(arch.layer(model, i), act, i, x, bias, shape, m)
        hidden_states.append(x)
        attentions.append(probs)

    head = arch.mlm_head(model)
    logits = mlm_logits(head, x, logits_at, m) if with_logits and head is not None else None
    return EncoderOutput(hidden_states, attentions, logits)


def encode_without_each(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    masks: Masks,
    with_logits: bool = False,
) -> dict[int, EncoderOutput]:
    """For each layer the masks keep, the final output (last hidden state, logits) with that
    layer faded out as well: `encode` with its fade at 0, computed once for the layers before it
    (their outputs do not depend on it), and with no work for the layers faded out (fade 0 makes
    a layer the identity). A greedy layer removal's round in about half the layer forwards of
    `encode` per candidate. No dropout, no gradient; `hidden_states` holds the last one only."""
    arch = architecture_for(model)
    shape = head_shape(arch.sizes(model.config), masks)
    m = Masking.of(masks, None, arch.embeddings(model).word.weight.dtype, input_ids.device, 0.0)
    act = arch.activation(model.config)
    head = arch.mlm_head(model) if with_logits else None
    kept = [i for i in range(arch.num_layers(model)) if m.host.layers[i]]
    x = embed(arch, model, input_ids, None, m)
    bias = attention_bias(arch, model, attention_mask, x.dtype)

    def through(x: torch.Tensor, layers: list[int]) -> torch.Tensor:
        for i in layers:
            x, _ = layer_forward(arch.layer(model, i), act, i, x, bias, shape, m)
        return x

    inputs = [x]  # the input of each kept layer, with every kept layer before it
    for i in kept[:-1]:
        inputs.append(through(inputs[-1], [i]))
    out = {}
    for n, i in enumerate(kept):
        y = through(inputs[n], kept[n + 1 :])
        out[i] = EncoderOutput([y], [], mlm_logits(head, y, None, m) if head else None)
    return out


def head_shape(sizes: dict, masks: Masks | None) -> HeadShape:
    """Heads and head size: the config's, or under masks the student's current ones
    (progressive.py cuts it), with the config's attention scale either way."""
    n_heads = sizes["heads"]
    head_dim = sizes["hidden"] // n_heads
    scale = 1.0 / math.sqrt(head_dim)
    if masks is not None:
        n_heads, head_dim = masks.qk.shape[1], masks.qk.shape[2]
    return HeadShape(n_heads, head_dim, scale)


def embed(arch, model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
          m: Masking) -> torch.Tensor:  # fmt: skip
    """Word + position (+ token type) embeddings, LayerNorm over the kept dims, dropout."""
    emb = arch.embeddings(model)
    positions = arch.position_ids(model, input_ids)
    x = emb.word(input_ids) + emb.position(positions)
    if emb.token_type is not None:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = x + emb.token_type(token_type_ids)
    x = m.norm(m.keep_hidden(x), emb.ln)
    return m.drop(x)


def attention_bias(arch, model: nn.Module, attention_mask: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """What is added to every layer's attention scores: -inf-like at padded keys, plus the
    family's own bias (MPNet's relative positions), [B or 1, H or 1, T, T]."""
    seq = attention_mask.shape[1]
    key_bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    family_bias = arch.attention_bias(model, seq, attention_mask.device)  # [H, T, T] or None
    if family_bias is not None:
        key_bias = key_bias + family_bias[None].to(dtype)
    return key_bias


def layer_forward(t, act, i: int, x: torch.Tensor, key_bias: torch.Tensor, shape: HeadShape,
                  m: Masking) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Layer `i` (the adapter's view `t` of it) under the masks: its output (faded towards its
    input while it is being removed) and its attention probabilities."""
    bsz, seq = x.shape[:2]
    masks = m.masks
    q, k, v = t.q(x), t.k(x), t.v(x)
    if masks is not None:
        qk_rows, vo_rows = masks.qk_rows(i).to(x.dtype), masks.vo_rows(i).to(x.dtype)
        q, k, v = q * qk_rows, k * qk_rows, v * vo_rows

    def heads(z: torch.Tensor) -> torch.Tensor:
        return z.view(bsz, seq, shape.n_heads, shape.head_dim).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) * shape.scale + key_bias
    probs = scores.softmax(-1)
    context = (m.drop(probs) @ heads(v)).transpose(1, 2).reshape(bsz, seq, -1)
    a = m.norm(m.keep_hidden(m.drop(t.o(context))) + x, t.attn_ln)
    inner = act(t.inter(a))
    if masks is not None:
        inner = inner * masks.ffn[i].to(inner.dtype)
    y = m.norm(m.keep_hidden(m.drop(t.out(inner))) + a, t.out_ln)
    if masks is not None:
        g = masks.fade[i]
        if not m.host.layers[i]:
            y = x + g * (y - x)  # fading out: fade 0 makes the layer the identity
        elif g.requires_grad:
            y = y + (g - g.detach()) * (y - x)  # same value, but dL/dfade for ranking
    return y, probs


def mlm_logits(head, x: torch.Tensor, logits_at: torch.Tensor | None, m: Masking) -> torch.Tensor:
    """The MLM head over every position, or over the flat positions `logits_at` only ([N, V])."""
    if logits_at is not None:
        x = x.reshape(-1, x.shape[-1]).index_select(0, logits_at)
    z = m.norm(m.keep_hidden(head.act(head.dense(x))), head.ln)
    return head.decoder(z)


def mean_pool(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers mean pooling over the real tokens."""
    m = attention_mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
