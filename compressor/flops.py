"""Model FLOPs of the supported encoders (every family has BERT's layer; MPNet's relative-position
bias is an addition, not counted), of a distillation step and of a recipe's whole budget, and
model FLOPs utilisation (MFU). Pure functions of shapes.

FLOPs are 2 x the multiply-adds of the matrix products (embedding look-ups, LayerNorm, softmax,
the loss terms and other element-wise work are left out, as in the usual 6ND accounting). For one
sequence of t tokens through a Shape (d hidden, a = heads x head_dim, i FFN, L layers):

    forward(s, t)  = L x [2t.d.a.3 (Q, K, V) + 2t^2.a.2 (scores, weighted values) + 2t.a.d (O)
                          + 2t.d.i.2 (FFN)]
                     + with an MLM head: 2t.d.d + 2t.d.V (transform, decoder over the vocabulary)

A distillation step on one sequence: the student forward and backward (3 x forward) at its
current widths, the learned hidden-state maps (L_teacher + 1 of them, d_student -> d_teacher,
trained: 3 x 2t.d_s.d_t each) and the teacher forward (no gradient):

    step(t) = 3 x forward(student, t) + 3 x (L_t + 1) x 2t.d_s.d_t + forward(teacher, t)

The student is counted at its current (alive) widths, the model it is becoming: the masked
forward computes at the teacher's width, so MFU falls as the student shrinks; it measures the
useful work. MFU = model FLOPs / wall-clock seconds / (the device's peak dense bf16 FLOP/s x the
number of devices).
"""

from __future__ import annotations

from compressor.shapes import Shape

# peak dense (no sparsity) bf16 tensor-core FLOP/s from the vendor's data sheets, matched as a
# substring of torch.cuda.get_device_name(); the first match wins, so specific names come first
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # also GH200
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def encoder_flops(s: Shape, seq: int) -> int:
    """FLOPs of one sequence through the encoder layers (embeddings and heads excluded)."""
    d, a, i, t = s.hidden, s.attn_width, s.ffn, seq
    per_layer = 2 * t * d * a * 3 + 2 * t * t * a * 2 + 2 * t * a * d + 2 * t * d * i * 2
    return s.layers * per_layer


def forward_flops(s: Shape, seq: int, mlm_vocab: int = 0, mlm_share: float = 1.0) -> int:
    """FLOPs of one sequence through the encoder and, when `mlm_vocab` > 0, an MLM head over a
    vocabulary of that size at `mlm_share` of the positions (1: every position; the training
    step runs it only where the loss reads it, the masked share)."""
    head = 2 * seq * s.hidden * s.hidden + 2 * seq * s.hidden * mlm_vocab if mlm_vocab else 0
    return encoder_flops(s, seq) + (head if mlm_share == 1 else round(head * mlm_share))


def step_flops(
    teacher: Shape, student: Shape, seq: int, mlm_vocab: int = 0, mlm_share: float = 1.0
) -> int:
    """Model FLOPs of one distillation step on one sequence of `seq` tokens (module docstring)."""
    maps = (teacher.layers + 1) * 2 * seq * student.hidden * teacher.hidden
    return (
        3 * forward_flops(student, seq, mlm_vocab, mlm_share)
        + 3 * maps
        + forward_flops(teacher, seq, mlm_vocab, mlm_share)
    )


def budget_flops(
    teacher: Shape,
    runs: list[tuple[Shape, int]],
    sequences: int,
    seq: int,
    mlm_vocab: int = 0,
    mlm_share: float = 1.0,
) -> int:
    """Model FLOPs of a whole run of `sequences` sequences a step, the student at the widths of
    each run of steps (schedule.width_runs: the schedule's width curve)."""
    return sequences * sum(n * step_flops(teacher, w, seq, mlm_vocab, mlm_share) for w, n in runs)


def peak_bf16_flops(device_name: str) -> float | None:
    """The device's peak dense bf16 FLOP/s, or None for a device not in PEAK_BF16_FLOPS."""
    for name, peak in PEAK_BF16_FLOPS:
        if name in device_name:
            return peak
    return None


def mfu(flops: float, seconds: float, peak: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of `devices` devices."""
    return flops / seconds / (peak * devices)


def projected_seconds(
    runs: list[tuple[float, int]], a: tuple[float, float], b: tuple[float, float]
) -> float:
    """Seconds of a run whose steps are `runs` of (FLOPs of one step, number of steps), from two
    measured steps `a` and `b`, each (FLOPs, seconds): a step's time taken as affine in its FLOPs
    through them (a fixed cost plus the FLOPs at the measured rate), so the widths between the
    first cut and the last are weighted by the schedule. Proportional to the FLOPs when both were
    measured at the same FLOPs."""
    (fa, sa), (fb, sb) = a, b
    if fa == fb:
        return sum(n * sa * f / fa for f, n in runs)
    slope = (sb - sa) / (fb - fa)
    return sum(n * (sa + (f - fa) * slope) for f, n in runs)
