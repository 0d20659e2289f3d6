"""Correctness checks. Each returns the measured number and raises CheckFailed past its tolerance."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel

from compressor.arch import architecture_for, student_parameters
from compressor.data import Batch
from compressor.errors import CheckFailed
from compressor.forward import EncoderOutput, encode
from compressor.prune.masks import Masks
from compressor.shapes import Shape, Vocab, param_count

IDENTITY_ATOL = 1e-5
SLIM_ATOL = 1e-4


def max_diff_on_tokens(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    real = attention_mask.bool()
    return float((a[real].float() - b[real].float()).abs().max())


@torch.no_grad()
def check_identity(teacher: nn.Module, student: nn.Module, batch: Batch, shape: Shape) -> float:
    """Step 0: the student under full masks must reproduce the teacher's stock forward."""
    ref = teacher(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
    )
    ref_last = ref.hidden_states[-1]
    out = encode(
        student, batch.input_ids, batch.attention_mask, Masks.full(shape, batch.input_ids.device)
    )
    diff = max_diff_on_tokens(ref_last, out.hidden_states[-1], batch.attention_mask)
    if not diff <= IDENTITY_ATOL:  # written so that NaN fails
        raise CheckFailed(
            f"step-0 identity: the student differs from the teacher by {diff:.3g}"
            f" (last hidden state, tolerance {IDENTITY_ATOL})"
        )
    return diff


@torch.no_grad()
def check_slim_roundtrip(
    masked_model: nn.Module, masks: Masks, slim_dir: Path, batch: Batch
) -> float:
    """The masked student and the saved, reloaded (stock AutoModel) slim model must agree."""
    reloaded = AutoModel.from_pretrained(slim_dir).eval()
    dev = next(masked_model.parameters()).device
    ids, att = batch.input_ids.to(dev), batch.attention_mask.to(dev)
    ref = encode(masked_model, ids, att, masks.to(dev)).hidden_states[-1].cpu()
    ref = ref[..., masks.hidden.cpu()]  # the masked student keeps the teacher's width
    got = reloaded(input_ids=ids.cpu(), attention_mask=att.cpu()).last_hidden_state
    diff = max_diff_on_tokens(ref, got, att.cpu())
    if not diff <= SLIM_ATOL:  # written so that NaN fails
        raise CheckFailed(
            f"slim round-trip: the reloaded model in {slim_dir} differs from the masked student"
            f" by {diff:.3g} (last hidden state, tolerance {SLIM_ATOL})"
        )
    return diff


def check_progressive_slim(
    masked: EncoderOutput,
    slimmed: EncoderOutput,
    kept_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    step: int,
) -> float:
    """After a progressive slim, the cut student must compute what it did masked: its last hidden
    state on the kept dims, on the held-out batch, within the slim round-trip's tolerance."""
    ref = masked.hidden_states[-1][..., kept_hidden.to(attention_mask.device)]
    diff = max_diff_on_tokens(ref, slimmed.hidden_states[-1], attention_mask)
    if not diff <= SLIM_ATOL:  # written so that NaN fails
        raise CheckFailed(
            f"progressive slim at step {step}: the cut student differs from the masked one by"
            f" {diff:.3g} (last hidden state on the held-out batch, tolerance {SLIM_ATOL})"
        )
    return diff


def check_finite_losses(step: int, losses: dict[str, float]) -> None:
    """Training stops at the first non-finite loss, naming the step and the term (the last good
    checkpoint stays as it was)."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        terms = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise CheckFailed(
            f"training diverged at step {step}: {terms}. Nothing was saved from this step; lower"
            " train.lr (or raise train.warmup_steps) and resume from the last checkpoint"
        )


def check_finite_weights(model: nn.Module, where: str) -> None:
    """Nothing non-finite is ever slimmed, exported or registered."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckFailed(f"{where}: non-finite weights in {shown}")


def check_param_count(model: nn.Module, shape: Shape, vocab: Vocab, mlm_head: bool) -> int:
    """The slim model's parameter count must equal the closed-form count for its shape."""
    has_pooler = architecture_for(model).pooler(model) is not None
    got = sum(p.numel() for p in student_parameters(model).values())
    want = param_count(shape, vocab, pooler=has_pooler, mlm_head=mlm_head)
    if got != want:
        raise CheckFailed(
            f"parameter count: slim model has {got}, the formula for {shape} says {want}"
        )
    return got


def roundtrip_in_tempdir(save, masked_model: nn.Module, masks: Masks, batch: Batch) -> float:
    """Save with `save(dir)` into a throwaway directory and run the round-trip check there."""
    with tempfile.TemporaryDirectory(prefix="compress-preflight-") as d:
        save(Path(d))
        return check_slim_roundtrip(masked_model, masks, Path(d), batch)
