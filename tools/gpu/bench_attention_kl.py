"""The attention KL's forward and backward over the 12 layers of one micro-batch at the BERT-base
shape, the formula before issue 23's item 3 (autograd through the fp32 expression) against
`losses.attention_kl` (the Function), alternating in one process: the median seconds of each and
their ratio, in fp32 or with bf16 attentions.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python tools/gpu/bench_attention_kl.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from compressor.losses import attention_kl, token_mean


def before(teacher, student, heads_alive, attention_mask):
    """attention_kl before item 3, as it was."""
    t = teacher.float()
    kl = (t * (t.clamp_min(1e-12).log() - student.float().clamp_min(1e-12).log())).sum(-1)
    alive = heads_alive.to(kl.dtype)[None, :, None]
    per_query = (kl * alive).sum(1) / alive.sum().clamp_min(1.0)
    return token_mean(per_query, attention_mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    shape = (a.batch, a.heads, a.seq, a.seq)
    ts = [torch.randn(shape, generator=g).softmax(-1).to(dtype) for _ in range(a.layers)]
    ss = [torch.randn(shape, generator=g).softmax(-1).to(dtype) for _ in range(a.layers)]
    alive = torch.ones(a.heads, dtype=torch.bool)
    att = torch.ones(a.batch, a.seq, dtype=torch.long)

    def run(fn) -> float:
        leaves = [s.clone().requires_grad_() for s in ss]
        start = time.perf_counter()
        sum(fn(t, s, alive, att) for t, s in zip(ts, leaves, strict=True)).backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"before": [], "now": []}
    run(before), run(attention_kl)  # warm-up
    for r in range(a.rounds):
        order = [("before", before), ("now", attention_kl)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(run(fn))
    old, new = (statistics.median(v) for v in times.values())
    print(f"attention KL, {a.layers} layers of {list(shape)}, {a.dtype}, forward + backward:"
          f" before {old * 1e3:.1f} ms, now {new * 1e3:.1f} ms (medians of {a.rounds});"
          f" now/before {new / old:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
