"""Distillation loss terms as pure functions of tensors, plus the learned hidden-state maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compressor.forward import mean_pool


class HiddenMaps(nn.Module):
    """One linear map per teacher hidden state (embeddings + each layer), student -> teacher width.

    The student keeps the teacher's width while masked (pruned dims are zero), so each map is
    D x D, initialised to the identity: the scatter of the kept dims, so every hidden-state loss is
    exactly 0 at step 0. Slimming a map keeps the columns of the kept dims.
    """

    def __init__(self, n_states: int, width: int):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(n_states))
        with torch.no_grad():
            for m in self.maps:
                m.weight.copy_(torch.eye(width))

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.maps[i](x)


def token_mean(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of a per-token quantity [B, T] over the real tokens."""
    m = attention_mask.to(values.dtype)
    return (values * m).sum() / m.sum()


def hidden_mse(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error per real token, averaged over dims."""
    return token_mean((student - teacher).pow(2).mean(-1), attention_mask)


def attention_kl(
    teacher: torch.Tensor,
    student: torch.Tensor,
    heads_alive: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """KL(teacher || student) of attention rows [B, H, T, T], over alive heads and real queries."""
    t = teacher.float()
    kl = (t * (t.clamp_min(1e-12).log() - student.float().clamp_min(1e-12).log())).sum(-1)
    alive = heads_alive.to(kl.dtype)[None, :, None]  # [1, H, 1]
    per_query = (kl * alive).sum(1) / alive.sum().clamp_min(1.0)  # [B, T]
    return token_mean(per_query, attention_mask)


def representation_cosine(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """1 - cosine of the mean-pooled final states (the sentence embedding of head-less teachers)."""
    s, t = mean_pool(student, attention_mask), mean_pool(teacher, attention_mask)
    return (1.0 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean()


def prediction_kl(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    positions: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) of MLM predictions at the selected positions [B, T] (bool)."""
    t = (teacher_logits[positions].float() / temperature).log_softmax(-1)
    s = (student_logits[positions].float() / temperature).log_softmax(-1)
    if t.shape[0] == 0:
        return student_logits.sum() * 0.0
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def mlm_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM loss; labels are -100 where no token was masked."""
    return F.cross_entropy(
        student_logits.float().view(-1, student_logits.shape[-1]),
        labels.view(-1),
        ignore_index=-100,
    )
