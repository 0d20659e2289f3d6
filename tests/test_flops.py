"""Model FLOPs against PyTorch's own FLOP counter on real forwards and a real distillation step;
the budget over the schedule's width curve; MFU and the device peaks; `recipe check`'s budget."""

import copy
import itertools
from dataclasses import replace

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

from compressor.budget import recipe_budget
from compressor.cli.main import main
from compressor.data import Batch
from compressor.flops import (
    budget_flops,
    forward_flops,
    mfu,
    peak_bf16_flops,
    step_flops,
)
from compressor.forward import encode
from compressor.losses import HiddenMaps, StudentLoss, weighted_total
from compressor.prune.masks import Masks
from compressor.prune.schedule import Schedule
from compressor.recipe import DistillSpec, load_recipe
from compressor.shapes import Shape
from tests.helpers import RECIPES, tiny_batch, tiny_bert, tiny_config


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_forward_flops_equal_the_counted_flops_of_a_real_forward():
    # eager attention: PyTorch's FLOP counter does not see inside every CPU SDPA kernel
    mlm = tiny_bert(mlm=True, attn_implementation="eager")
    n, t = 3, 12
    ids = torch.randint(5, 120, (n, t), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    shape = Shape.of_config(mlm.config)
    want = n * forward_flops(shape, t, 120)
    assert counted(lambda: mlm(input_ids=ids, attention_mask=att)) == want
    encoder = BertModel(tiny_config(attn_implementation="eager"), add_pooling_layer=False)
    assert counted(lambda: encoder(input_ids=ids, attention_mask=att)) == n * forward_flops(
        shape, t
    )


def test_step_flops_equal_the_counted_flops_of_a_real_distillation_step():
    """Teacher forward + the student's loss forward and backward, as the loop runs them."""
    teacher = tiny_bert(mlm=True)
    student = copy.deepcopy(teacher).train()
    shape = Shape.of_config(teacher.config)
    masks = Masks.full(shape)
    fade = torch.nn.Parameter(masks.fade.clone())
    model = StudentLoss(student, HiddenMaps(shape.layers + 1, shape.hidden), fade, True)
    ids, att = tiny_batch()
    batch, d = Batch(ids, att, ids.clone()), DistillSpec(mlm=1.0)

    def step():
        with torch.no_grad():
            t_out = encode(teacher, ids, att, with_logits=True)
        weighted_total(d, model(d, t_out, replace(masks, fade=fade), batch)).backward()

    assert counted(step) == ids.shape[0] * step_flops(shape, shape, ids.shape[1], 120)


def test_a_narrower_student_costs_less_and_the_teacher_forward_stays():
    full, small = Shape(12, 768, 12, 64, 3072), Shape(6, 384, 12, 32, 1536)
    assert step_flops(full, small, 128) < step_flops(full, full, 128)
    assert step_flops(full, small, 128) > forward_flops(full, 128)


def test_widths_in_force_hold_between_pruning_events():
    full, target = Shape(6, 384, 12, 32, 1536), Shape(2, 128, 4, 32, 256)
    sched = Schedule("cubic", 2, 10, 4, full, target)
    at = [sched.widths_in_force(s) for s in range(14)]
    assert at[0] == at[1] == full  # before the first event
    for event in (2, 6, 10):
        assert at[event] == sched.widths_at(event)
    assert at[3] == at[4] == at[5] == at[2] and at[7] == at[6]
    assert at[11] == at[13] == target
    one = [Schedule("one_shot", 3, 3, 1, full, target).widths_in_force(s) for s in (2, 3, 9)]
    assert one == [full, target, target]


def test_width_runs_are_the_widths_in_force_step_by_step():
    full, target = Shape(6, 384, 12, 32, 1536), Shape(2, 128, 4, 32, 256)
    for kind, start, end, interval, steps in [("cubic", 2, 40, 3, 50), ("linear", 0, 9, 1, 9),
                                              ("one_shot", 5, 5, 1, 12), ("cubic", 0, 7, 7, 3)]:  # fmt: skip
        sched = Schedule(kind, start, end, interval, full, target)
        runs = sched.width_runs(steps)
        flat = [w for w, n in runs for _ in range(n)]
        assert flat == [sched.widths_in_force(s) for s in range(steps)]
        assert all(a != b for (a, _), (b, _) in itertools.pairwise(runs))


def test_a_huge_budget_is_computed_from_its_runs_not_step_by_step():
    full, target = Shape(12, 768, 12, 64, 3072), Shape(6, 384, 12, 32, 1536)
    runs = Schedule("cubic", 0, 10**12, 1, full, target).width_runs(10**15)
    assert sum(n for _, n in runs) == 10**15 and runs[-1] == (target, 10**15 - 10**12)


def test_the_budget_follows_the_width_curve():
    full, target = Shape(6, 384, 12, 32, 1536), Shape(2, 128, 4, 32, 256)
    r = load_recipe(RECIPES / "tiny-test.yaml")
    b = recipe_budget(r, full, 0)
    sched = Schedule.of(r.pruning, full, target)
    per_step = [step_flops(full, sched.widths_in_force(s), 32) for s in range(r.train.steps)]
    assert b.flops == 4 * sum(per_step) and b.tokens == 8 * 4 * 32
    assert (
        budget_flops(full, [(target, 8)], 4, 32) < b.flops < budget_flops(full, [(full, 8)], 4, 32)
    )


@pytest.mark.parametrize(
    "name,peak",
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
     ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla V100-SXM2-16GB", None)],
)  # fmt: skip
def test_peak_bf16_flops_by_device_name(name, peak):
    assert peak_bf16_flops(name) == peak


def test_mfu_is_the_achieved_share_of_the_peak():
    assert mfu(989e12, 2.0, 989e12) == 0.5
    assert mfu(989e12, 1.0, 989e12, devices=2) == 0.5


def test_recipe_check_prints_the_budget(tmp_path):
    """The full-size recipe with a local BERT-base config: tokens and FLOPs, no weights."""
    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
    path = RECIPES / "bert-base-to-6L384.yaml"
    args = ["recipe", "check", str(path), "--set", "teacher.source=local",
            "--set", f"teacher.id={tmp_path}"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    r = load_recipe(path)
    b = recipe_budget(r, Shape(12, 768, 12, 64, 3072), 30522)
    assert f"= {b.tokens:,} tokens" in res.output and b.tokens == 28000 * 4096 * 128
    assert f"training FLOPs: {b.flops:.3g}" in res.output
    offline = CliRunner().invoke(main, ["recipe", "check", str(path)])  # hub config unreachable
    assert offline.exit_code == 0 and "need the teacher's config" in offline.output


@pytest.mark.slow
def test_recipe_check_probe_predicts_the_wall_time(tmp_path):
    raw = yaml.safe_load((RECIPES / "tiny-test.yaml").read_text())
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(main, ["recipe", "check", str(path), "--probe",
                                    "--set", "train.threads=1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "wall time on cpu (fp32)" in res.output and "median of 3 micro-batches" in res.output
