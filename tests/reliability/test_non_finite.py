"""A NaN model must never pass a check, reach the zoo or be exported (issue 12, first part): every
numeric check is written so that NaN fails, training stops at the first non-finite loss or
gradient, and non-finite recipe values are refused before anything runs."""

from __future__ import annotations

import pytest
import torch

from compressor import pipeline
from compressor.checks import check_finite_losses, check_finite_weights
from compressor.errors import CheckFailed, RecipeError
from compressor.gates import gate_failures
from compressor.recipe import GatesSpec, load_recipe, parse_recipe, recipe_to_dict
from compressor.rundir import SUMMARY_FILE
from tests.helpers import RECIPES, small_recipe, small_teacher, tiny_bert

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_non_finite_loss_stops_training_naming_step_and_term(bad):
    check_finite_losses(3, {"hidden": 0.1, "attention": 0.2})  # finite: passes
    with pytest.raises(CheckFailed, match=r"diverged at step 7: attention = "):
        check_finite_losses(7, {"hidden": 0.1, "attention": bad})


def test_non_finite_weights_are_refused():
    model = tiny_bert()
    check_finite_weights(model, "ok")
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = NAN
    with pytest.raises(CheckFailed, match=r"encoder\.layer\.1\.output\.dense\.weight"):
        check_finite_weights(model, "the trained student")


def test_gates_fail_on_nan_measurements():
    gates = GatesSpec(min_speedup=1.5, max_discrepancy=0.5)
    bench = {"results": [{"runtime": "onnxruntime", "speedup_p50": NAN}]}
    failures = gate_failures(gates, {"discrepancy": {"final": NAN}}, bench)
    assert len(failures) == 2 and all("nan" in f for f in failures)


@pytest.mark.parametrize("key,value", [("lr", INF), ("lr", NAN), ("adam_eps", INF)])
def test_non_finite_recipe_values_are_refused(key, value):
    raw = recipe_to_dict(load_recipe(RECIPES / "tiny-test.yaml"))
    raw["train"][key] = value
    with pytest.raises(RecipeError, match=rf"train\.{key}"):
        parse_recipe(raw)


def test_a_diverging_run_stops_and_leaves_nothing_to_register(tmp_path, packaged_tokenizer):
    """lr 1e6 on a small seeded BERT: the loss leaves the finite range within a few steps."""
    recipe = small_recipe(steps=6, lr=1e6)
    with pytest.raises(CheckFailed, match=r"training diverged at step \d+"):
        pipeline.run(recipe, tmp_path, teacher=small_teacher(packaged_tokenizer))
    run_dir = next(tmp_path.glob("*/*/"))
    assert not (run_dir / SUMMARY_FILE).exists()  # not finished, so never exported or registered
    assert not (run_dir / "model").exists()
