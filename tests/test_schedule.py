from hypothesis import given
from hypothesis import strategies as st

from compressor.prune import schedule
from compressor.prune.schedule import Schedule
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
    assert Schedule("one_shot", 10, 100, 7, FULL, TARGET).is_event(10)
    assert not Schedule("one_shot", 10, 100, 7, FULL, TARGET).is_event(17)


def test_pruning_steps_include_the_end():
    sched = Schedule("cubic", 5, 47, 10, FULL, TARGET)
    steps = [s for s in range(200) if sched.is_event(s)]
    assert steps == [5, 15, 25, 35, 45, 47]


def test_events_in_a_range_are_found_without_walking_it():
    """Every (kind, start, end, interval, first, stop) of a small grid, against the walk."""
    for kind in ("cubic", "linear", "one_shot"):
        for start in range(8):
            for end in range(start, 10):
                for interval in range(1, 4):
                    sched = Schedule(kind, start, end, interval, FULL, TARGET)
                    events = [s for s in range(14) if sched.is_event(s)]
                    for first in range(13):
                        for stop in range(first, 14):
                            found = any(first <= e < stop for e in events)
                            assert sched.events_in(first, stop) == found, (sched, first, stop)


def test_widths_endpoints():
    sched = Schedule("cubic", 0, 100, 1, FULL, TARGET)
    assert sched.widths_at(0) == FULL
    assert sched.widths_at(100) == TARGET


@given(st.integers(0, 300), st.integers(0, 300), st.sampled_from(["cubic", "linear", "one_shot"]))
def test_widths_never_grow_and_stay_in_bounds(a, b, kind):
    lo, hi = sorted((a, b))
    sched = Schedule(kind, 20, 200, 1, FULL, TARGET)
    w_lo, w_hi = sched.widths_at(lo), sched.widths_at(hi)
    for f in ("layers", "hidden", "heads", "head_dim", "ffn"):
        assert getattr(TARGET, f) <= getattr(w_hi, f) <= getattr(w_lo, f) <= getattr(FULL, f)


def test_lr_warmup_then_decay():
    assert schedule.lr_at(0, 1.0, 10, 100) == 0.1
    assert schedule.lr_at(9, 1.0, 10, 100) == 1.0
    assert schedule.lr_at(55, 1.0, 10, 100) == 0.5
    assert schedule.lr_at(100, 1.0, 10, 100) == 0.0
