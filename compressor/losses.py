"""Distillation loss terms as pure functions of tensors, the learned hidden-state maps, the
assembly of the recipe's terms (`loss_terms`, `weighted_total`) and `StudentLoss`, the module
that turns a batch into those terms (what DDP wraps)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.data import Batch
from compressor.forward import EncoderOutput, encode, mean_pool
from compressor.prune.masks import HostMasks, Masks, MasksMemo
from compressor.recipe import DistillSpec


@dataclass(frozen=True)
class Correspondence:
    """Which of the teacher's layers, and which of its heads in each, the student's layers stand
    for, once the student is narrower than its teacher in depth or heads (progressive slimming).
    None in its place: the student has the teacher's layers and heads."""

    layers: list[int]  # per student layer, the teacher's layer
    heads: list[torch.Tensor]  # per student layer, the teacher's heads it kept [H']
    hidden: torch.Tensor | None = None  # the teacher's hidden dims the student's dims are [D']


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


KL_CHUNK = 1 << 24  # elements of [B, H, T, T] upcast at once (64 MiB of fp32)


def batch_slices(x: torch.Tensor) -> int:
    """Rows of the batch per slice of at most KL_CHUNK elements (at least one)."""
    return max(1, KL_CHUNK // max(1, x[0].numel()))


def attention_row_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each attention row [B, .., T] -> [B, ..], in fp32 from inputs of
    any float dtype, probabilities floored at 1e-12. Computed a slice of the batch at a time, so
    no fp32 copy of a whole layer's bf16 attentions is made (slices give the same bits: the sum
    runs over the last dim only)."""
    rows = batch_slices(teacher)
    if teacher.shape[0] <= rows:
        return _row_kl(teacher.float(), student.float())
    parts = zip(teacher.split(rows), student.split(rows), strict=True)
    return torch.cat([_row_kl(t.float(), s.float()) for t, s in parts])


def _row_kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(t * (log max(t, 1e-12) - log max(s, 1e-12))).sum(-1), in place on two new tensors."""
    d = t.clamp_min(1e-12).log_()
    return d.sub_(s.clamp_min(1e-12).log_()).mul_(t).sum(-1)


class AttentionKL(torch.autograd.Function):
    """`attention_row_kl`, its gradient toward the student computed from the tensors the step
    holds anyway (the teacher's and the student's attentions, in their own dtype): autograd
    through the formula keeps the floored student attentions per layer until the backward (and,
    for bf16 attentions, fp32 copies of both), each a new fp32 [B, H, T, T].
    The gradient is autograd's, op for op (d/ds of -t log max(s, 1e-12), zero where s < 1e-12),
    so an fp32 step is bit for bit what it was."""

    @staticmethod
    def forward(ctx, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(teacher, student)
        return attention_row_kl(teacher, student)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
        teacher, student = ctx.saved_tensors
        rows = batch_slices(teacher)
        if teacher.shape[0] <= rows:
            return None, _row_kl_grad(grad, teacher.float(), student.float()).to(student.dtype)
        parts = zip(grad.split(rows), teacher.split(rows), student.split(rows), strict=True)
        return None, torch.cat(
            [_row_kl_grad(g, t.float(), s.float()).to(student.dtype) for g, t, s in parts]
        )


def _row_kl_grad(grad: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What autograd computes through `_row_kl` toward s, in its order (the backward of the sum,
    the product, the difference, the log, clamp_min), in place on one new tensor. Dividing by s
    rather than max(s, 1e-12) changes no bit: where they differ the gradient is set to 0."""
    g = (grad.unsqueeze(-1) * t).neg_().div_(s)
    return g.masked_fill_((s >= 1e-12).logical_not_(), 0.0)


def attention_kl(
    teacher: torch.Tensor,
    student: torch.Tensor,
    heads_alive: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """KL(teacher || student) of attention rows [B, H, T, T], over alive heads and real queries,
    in fp32 whatever the attentions' dtype (bf16 under autocast)."""
    kl = AttentionKL.apply(teacher, student)  # [B, H, T] fp32
    alive = heads_alive.to(kl.dtype)[None, :, None]  # [1, H, 1]
    per_query = (kl * alive).sum(1) / alive.sum().clamp_min(1.0)  # [B, T]
    return token_mean(per_query, attention_mask)


def representation_cosine(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """1 - cosine of the mean-pooled final states (the sentence embedding of head-less teachers)."""
    s, t = mean_pool(student.float(), attention_mask), mean_pool(teacher.float(), attention_mask)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def embedding_cosine(
    student: torch.Tensor,
    teacher: torch.Tensor,
    hidden_alive: torch.Tensor,
    attention_mask: torch.Tensor,
    teacher_dims: torch.Tensor | None = None,
) -> torch.Tensor:
    """1 - cosine of the sentence embedding that ships (the student's mean-pooled final states,
    no map) and the teacher's in the coordinates the student keeps: the teacher's hidden dims
    `teacher_dims` (a slimmed student; None: the student has the teacher's dims), of which the
    alive ones (`hidden_alive` [D'], the masks of a masked student). HomoDistil's student is the
    teacher with units removed, so its embedding is trained toward what it can represent
    exactly: the teacher's, restricted to the dims it kept."""
    s = mean_pool(student.float(), attention_mask)
    t = mean_pool(teacher.float(), attention_mask)
    if teacher_dims is not None:
        t = t[:, teacher_dims.to(t.device)]
    alive = hidden_alive.to(s.dtype)
    return (1.0 - F.cosine_similarity(s * alive, t * alive, dim=-1)).mean()


def similarity_mse(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared difference of the in-batch pairwise cosine similarities of the mean-pooled
    final states: the geometry of what ships, with no learned map (widths may differ)."""
    s = F.normalize(mean_pool(student.float(), attention_mask), dim=-1)
    t = F.normalize(mean_pool(teacher.float(), attention_mask), dim=-1)
    i, j = torch.triu_indices(s.shape[0], s.shape[0], offset=1, device=s.device)
    return ((s @ s.T)[i, j] - (t @ t.T)[i, j]).pow(2).mean()


def scaled_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in fp32: a bf16 input is upcast and divided in one new tensor (an
    fp32 one divided as it always was; dividing by 1 is skipped: it changes no bit)."""
    x = logits.float()
    if temperature == 1.0:
        return x
    return x / temperature if x is logits else x.div_(temperature)


def prediction_kl(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    positions: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) of MLM predictions at the selected positions [B, T] (bool);
    None: the logits [N, V] are those positions' already (forward.encode `logits_at`)."""
    if positions is not None:
        teacher_logits, student_logits = teacher_logits[positions], student_logits[positions]
    t = scaled_fp32(teacher_logits, temperature).log_softmax(-1)
    s = scaled_fp32(student_logits, temperature).log_softmax(-1)
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


# ---------------------------------------------------------------------------- assembly


def loss_terms(
    d: DistillSpec,
    t: EncoderOutput,
    s: EncoderOutput,
    maps: HiddenMaps,
    masks: Masks,
    batch: Batch,
    correspondence: Correspondence | None = None,
    host: HostMasks | None = None,
) -> dict[str, torch.Tensor]:
    """Each loss term, unweighted. Layers being removed are left out of the layer-wise terms.
    `correspondence` names the teacher's layer and heads of each of the student's layers (a
    progressively slimmed student); None: the student has the teacher's layers and heads.
    `host`: `HostMasks.of(masks)` when the caller keeps it (no device read per layer)."""
    att = batch.attention_mask
    c = correspondence
    teacher_layer = c.layers if c is not None else range(masks.layers.numel())
    kept = host.layers if host is not None else [bool(k) for k in masks.layers]
    # (student state, teacher state): the embeddings, then each layer that stays
    mapped = [(0, 0)] + [(i + 1, t_i + 1) for i, t_i in enumerate(teacher_layer) if kept[i]]
    out: dict[str, torch.Tensor] = {}
    if d.hidden > 0:
        out["hidden"] = sum(
            hidden_mse(maps(j, s.hidden_states[i].float()), t.hidden_states[j], att)
            for i, j in mapped
        ) / len(mapped)
    if d.attention > 0:
        layers = mapped[1:]

        def teacher_attention(i: int, j: int) -> torch.Tensor:
            a = t.attentions[j - 1]
            return a if c is None else a[:, c.heads[i - 1].to(a.device)]

        out["attention"] = sum(
            attention_kl(teacher_attention(i, j), s.attentions[i - 1], masks.heads[i - 1], att)
            for i, j in layers
        ) / max(1, len(layers))
    if s.logits is not None and t.logits is not None:
        # logits [N, V] at batch.label_index only (train/step.py), or [B, T, V] everywhere
        at_labels = s.logits.ndim == 2
        labels = batch.labels.flatten()[batch.label_index] if at_labels else batch.labels
        if d.prediction > 0:
            positions = None if at_labels else batch.labels != -100
            out["prediction"] = prediction_kl(t.logits, s.logits, positions, d.temperature)
        if d.mlm > 0:
            out["mlm"] = mlm_cross_entropy(s.logits, labels)
    else:
        last = len(t.hidden_states) - 1
        if d.prediction > 0:
            out["prediction"] = representation_cosine(
                maps(last, s.hidden_states[-1].float()), t.hidden_states[-1], att
            )
        if d.embedding > 0:
            dims = c.hidden if c is not None else None
            out["embedding"] = embedding_cosine(
                s.hidden_states[-1], t.hidden_states[-1], masks.hidden, att, dims
            )
        if d.similarity > 0 and att.shape[0] > 1:
            out["similarity"] = similarity_mse(s.hidden_states[-1], t.hidden_states[-1], att)
    return out


def weighted_total(d: DistillSpec, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    weights = {
        "hidden": d.hidden,
        "attention": d.attention,
        "prediction": d.prediction,
        "mlm": d.mlm,
        "similarity": d.similarity,
        "embedding": d.embedding,
    }
    return sum(weights[k] * v for k, v in losses.items())


class StudentLoss(nn.Module):
    """The student, its hidden-state maps and the layer fades: everything that learns, or is
    ranked, from a gradient, as one module. Its forward is the student's forward (under bf16
    autocast when asked) and the loss terms against the teacher's outputs, always in fp32 outside
    autocast: at step 0 the identity student's terms are exactly 0 in either precision. Under
    torchrun this is the module DDP wraps, so all of these gradients are all-reduced together."""

    def __init__(self, student: nn.Module, maps: HiddenMaps, fade: nn.Parameter, with_logits: bool):
        super().__init__()
        self.student, self.maps, self.fade = student, maps, fade
        self.with_logits = with_logits
        self.correspondence: Correspondence | None = None  # once progressively slimmed
        self.host = MasksMemo(HostMasks.of)  # what the step branches on, read once per masks

    def forward(
        self,
        d: DistillSpec,
        t: EncoderOutput,
        masks: Masks,
        batch: Batch,
        dropout: float = 0.0,
        bf16: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The unweighted loss terms; `masks.fade` must be this module's `fade`."""
        autocast = torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16)
        host = self.host(masks)
        with autocast:
            s = encode(self.student, batch.input_ids, batch.attention_mask, masks,
                       with_logits=self.with_logits, dropout=dropout,
                       logits_at=batch.label_index, host=host)  # fmt: skip
        return loss_terms(d, t, s, self.maps, masks, batch, self.correspondence, host)
