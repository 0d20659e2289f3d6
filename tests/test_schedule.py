from hypothesis import given
from hypothesis import strategies as st

from compressor.prune import schedule
from compressor.shapes import Shape

FULL = Shape(12, 768, 12, 64, 3072)
TARGET = Shape(6, 384, 12, 32, 1536)


def test_cubic_values():
    assert schedule.remaining(0, "cubic", 0, 100) == 1.0
    assert schedule.remaining(50, "cubic", 0, 100) == 0.125
    assert schedule.remaining(100, "cubic", 0, 100) == 0.0
    assert schedule.remaining(10, "cubic", 20, 100) == 1.0


def test_linear_and_one_shot():
    assert schedule.remaining(25, "linear", 0, 100) == 0.75
    assert schedule.remaining(9, "one_shot", 10, 100) == 1.0
    assert schedule.remaining(10, "one_shot", 10, 100) == 0.0
    assert schedule.is_pruning_step(10, 10, 100, 7, "one_shot")
    assert not schedule.is_pruning_step(17, 10, 100, 7, "one_shot")


def test_pruning_steps_include_the_end():
    steps = [s for s in range(200) if schedule.is_pruning_step(s, 5, 47, 10, "cubic")]
    assert steps == [5, 15, 25, 35, 45, 47]


def test_widths_endpoints():
    assert schedule.widths_at(0, FULL, TARGET, "cubic", 0, 100) == FULL
    assert schedule.widths_at(100, FULL, TARGET, "cubic", 0, 100) == TARGET


@given(st.integers(0, 300), st.integers(0, 300), st.sampled_from(["cubic", "linear", "one_shot"]))
def test_widths_never_grow_and_stay_in_bounds(a, b, kind):
    lo, hi = sorted((a, b))
    w_lo = schedule.widths_at(lo, FULL, TARGET, kind, 20, 200)
    w_hi = schedule.widths_at(hi, FULL, TARGET, kind, 20, 200)
    for f in ("layers", "hidden", "heads", "head_dim", "ffn"):
        assert getattr(TARGET, f) <= getattr(w_hi, f) <= getattr(w_lo, f) <= getattr(FULL, f)


def test_lr_warmup_then_decay():
    assert schedule.lr_at(0, 1.0, 10, 100) == 0.1
    assert schedule.lr_at(9, 1.0, 10, 100) == 1.0
    assert schedule.lr_at(55, 1.0, 10, 100) == 0.5
    assert schedule.lr_at(100, 1.0, 10, 100) == 0.0
