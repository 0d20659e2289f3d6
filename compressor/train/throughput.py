"""Tokens per second and model FLOPs utilisation over the window since the last log record."""

from __future__ import annotations

import time

import torch

from compressor import distributed
from compressor.data import Batch
from compressor.flops import mfu, peak_bf16_flops, step_flops
from compressor.shapes import Shape


class Throughput:
    """Counts real tokens (on the host) and the FLOPs the hardware computes in each step (the
    student at the widths its tensors have: the teacher's while masked, the cut widths once
    progressively slimmed; the MLM head at the positions it runs at); `window` sums them over
    the processes with the loss terms and starts a new window."""

    def __init__(self, full: Shape, mlm_vocab: int, device: torch.device):
        self.full, self.mlm_vocab = full, mlm_vocab
        self.peak = (
            peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        )
        self.tokens, self.flops, self.since = 0, 0, time.perf_counter()
        self.rate, self.mfu = 0.0, None  # of the last window

    def add(self, batch: Batch) -> tuple[int, int, int]:
        """One micro-batch (on the host); returns its (sequences, length, positions the MLM head
        runs at) for `add_flops`."""
        self.tokens += int(batch.attention_mask.numpy().sum())  # host data: no device read
        n, t = batch.attention_mask.shape
        at = batch.label_index.numel() if batch.label_index is not None else n * t
        return n, t, at

    def add_flops(self, shapes: list[tuple[int, int, int]], widths: Shape) -> None:
        """The step's micro-batches through a student whose tensors have `widths`."""
        self.flops += sum(
            n * step_flops(self.full, widths, t, self.mlm_vocab, mlm_share=at / (n * t))
            for n, t, at in shapes
        )

    def window(self, terms: dict[str, float]) -> dict[str, float]:
        """`terms` summed over the processes; sets `rate` (tokens/s) and `mfu` (on a CUDA device
        of known peak) of the window, and starts the next."""
        total = distributed.sum_over_ranks({**terms, "tokens": self.tokens, "flops": self.flops})
        seconds = time.perf_counter() - self.since  # wall clock
        self.rate, flops = total.pop("tokens") / seconds, total.pop("flops")
        if self.peak:
            self.mfu = mfu(flops, seconds, self.peak, distributed.world_size())
        self.tokens, self.flops, self.since = 0, 0, time.perf_counter()
        return total
