"""Progressive slimming: a cut student computes what the masked one did, its importance scores
what the masked one's did, a run with it equals masking only, and it resumes across a cut."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from compressor import pipeline
from compressor.bert_params import student_parameters
from compressor.forward import encode
from compressor.metrics import read_metrics
from compressor.prune.importance import EmaState, entry_scores, structure_scores, update_state
from compressor.prune.masks import Masks, prune_to, zero_pruned_weights
from compressor.prune.progressive import (
    Units,
    cut_importance,
    cut_kinds,
    cut_masks,
    cut_student,
    cut_tensor,
    renamed,
    tensor_cuts,
)
from compressor.prune.schedule import Schedule
from compressor.prune.slim import PrunePlan, slim
from compressor.recipe import load_recipe
from compressor.shapes import Shape
from compressor.train.state import FADE
from tests.helpers import RECIPES, sharp_tiny_bert, tiny_batch, tiny_bert

FULL = Shape(3, 32, 4, 8, 64)
TINY = RECIPES / "tiny-test.yaml"
NO_EXPORT = ["export.onnx=false", "bench.enabled=false"]
SLIMMED = [*NO_EXPORT, "pruning.progressive_slim=true"]
WEIGHTS_ATOL = 1e-5  # progressive slimming vs masking only after the tiny recipe's 8 steps


def scores(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.rand(32, generator=g), "heads": torch.rand(3, 4, generator=g),
        "qk": torch.rand(3, 4, 8, generator=g), "vo": torch.rand(3, 4, 8, generator=g),
        "ffn": torch.rand(3, 64, generator=g),
    }  # fmt: skip


def two_cuts(seed: int) -> tuple[Masks, Masks]:
    """Masks at a mid-schedule width with layer 1 fading (fade 0.5), then narrower with layer 1
    faded out (fade 0): the second a subset of the first."""
    layers = torch.tensor([True, False, True])
    first = prune_to(Masks.full(FULL), scores(seed), Shape(3, 24, 3, 7, 48))
    first = replace(first, layers=layers, fade=torch.tensor([1.0, 0.5, 1.0]))
    second = prune_to(first, scores(seed + 100), Shape(2, 12, 2, 6, 24))
    return first, replace(second, fade=torch.tensor([1.0, 0.0, 1.0]))


def real(x, att):
    return x[att.bool()]


@pytest.mark.parametrize("mlm", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_cut_twice_computes_what_the_masks_do(mlm, seed):
    """Sharp attention, so a wrong attention scale after the head size shrinks shows."""
    model = sharp_tiny_bert(mlm=mlm, seed=seed)
    cut_model = copy.deepcopy(model)
    first, second = two_cuts(seed)
    ids, att = tiny_batch()

    cut1 = Units.kept(first)
    cut_student(cut_model, cut1, FULL.head_dim)
    masks1 = cut_masks(first, cut1)
    assert masks1.tensor_shape() == Shape(3, 24, 3, 7, 48)  # the fading layer stays
    cut2 = Units.kept(cut_masks(second, cut1))
    cut_student(cut_model, cut2, masks1.qk.shape[2])
    masks2 = cut_masks(cut_masks(second, cut1), cut2)
    assert masks2.tensor_shape() == Shape(2, 12, 2, 6, 24)  # the faded-out layer is gone

    with torch.no_grad():
        want = encode(model, ids, att, second, with_logits=mlm)
        got = encode(cut_model, ids, att, masks2, with_logits=mlm)
    diff = real(got.hidden_states[-1] - want.hidden_states[-1][..., second.hidden], att)
    assert diff.abs().max() <= 1e-5
    if mlm:
        assert real(got.logits - want.logits, att).abs().max() <= 1e-4

    # the composed units map back to the teacher's indices: the same plan as the masks'
    units = Units.identity(FULL).then(cut1).then(cut2)
    plan = PrunePlan.from_masks(second, FULL)
    assert PrunePlan.from_masks(units.in_teacher(masks2, FULL), FULL) == plan
    # and the final slim of the cut student is the stock model the masked one slims to
    small = slim(cut_model, PrunePlan.from_masks(masks2, masks2.tensor_shape()), FULL.head_dim)
    ref = slim(model, plan)
    with torch.no_grad():
        a = small(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
        b = ref(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
    assert real(a - b, att).abs().max() <= 1e-5


def test_first_cut_keeps_the_fading_layer_and_computes_what_the_masks_do():
    model = sharp_tiny_bert(seed=3)
    cut_model = copy.deepcopy(model)
    first, _ = two_cuts(3)
    cut = Units.kept(first)
    cut_student(cut_model, cut, FULL.head_dim)
    ids, att = tiny_batch()
    with torch.no_grad():
        want = encode(model, ids, att, first).hidden_states[-1][..., first.hidden]
        got = encode(cut_model, ids, att, cut_masks(first, cut)).hidden_states[-1]
    assert real(got - want, att).abs().max() <= 1e-5


def random_grads(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in student_parameters(model).items()}


@pytest.mark.parametrize("uncertainty", [True, False])
def test_importance_after_a_cut_scores_the_kept_structures_as_masked(uncertainty):
    """EMA updates before pruning, then pruning (zeroed weights), a cut, and more updates: the
    cut state's structure scores equal the masked state's, for the kept structures."""
    b1, b2 = 0.85, 0.95
    masked = tiny_bert(seed=4)
    params = student_parameters(masked)
    fade = torch.ones(3)
    state = EmaState.zeros_like({**params, FADE: fade})
    for k in range(3):  # history while everything is alive
        for n, grad in random_grads(masked, k).items():
            params[n].grad = grad
        update_state(state, {**params, FADE: fade}, "sensitivity", b1, b2)
    first, _ = two_cuts(4)
    zero_pruned_weights(masked, first)
    cut = Units.kept(first)
    cut_model = copy.deepcopy(masked)
    cuts = tensor_cuts(masked, cut, FULL.head_dim)
    cut_state = cut_importance(state, masked, cut, FULL.head_dim, first.layers, FADE)
    cut_student(cut_model, cut, FULL.head_dim)
    cut_params = student_parameters(cut_model)
    for k in range(3, 6):  # after the cut: the same gradients, cut alike
        grads = random_grads(masked, k)
        for n, grad in grads.items():
            params[n].grad = grad
            cut_params[renamed(n, cut)].grad = cut_tensor(grad, cuts[n])
        update_state(state, {**params, FADE: fade}, "sensitivity", b1, b2)
        update_state(cut_state, {**cut_params, FADE: fade}, "sensitivity", b1, b2)

    for want_entries, got_entries in (
        (entry_scores(state, uncertainty), entry_scores(cut_state, uncertainty)),
        (state.mean_importance(b1), cut_state.mean_importance(b1)),
    ):
        want = cut_kinds(structure_scores(masked, want_entries, 8, first.layers), cut)
        got = structure_scores(cut_model, got_entries, 7, cut_masks(first, cut).layers)
        for kind in want:
            assert torch.allclose(got[kind], want[kind], rtol=1e-5, atol=0), kind


@pytest.fixture(scope="module")
def progressive(tmp_path_factory):
    """The tiny recipe with progressive slimming (no export)."""
    out = tmp_path_factory.mktemp("progressive")
    return pipeline.run(TINY, output=out, overrides=SLIMMED, register=False)


def test_progressive_slimming_equals_masking_only(progressive, tiny_run):
    slimmed, masked = progressive.run_dir, tiny_run.run_dir
    assert (slimmed / "plan.json").read_text() == (masked / "plan.json").read_text()
    a = load_file(slimmed / "model" / "model.safetensors")
    b = load_file(masked / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHTS_ATOL
    assert progressive.summary["checks"]["masked_vs_slim_max_abs"] <= 1e-4


def test_every_cut_is_checked_and_follows_the_schedule(progressive):
    recipe = load_recipe(TINY)
    full = Shape(**progressive.summary["teacher_shape"])
    sched = Schedule.of(recipe.pruning, full, recipe.target.shape())
    shapes = sched.shapes_by_step(recipe.train.steps)
    cuts = [
        r for r in read_metrics(progressive.run_dir / "metrics.jsonl") if r.get("event") == "slim"
    ]
    changes = [s for s in range(1, len(shapes)) if shapes[s] != shapes[s - 1]]
    assert [r["step"] for r in cuts] == changes  # a cut wherever the schedule narrows
    for r in cuts:
        assert r["masked_vs_slim_max_abs"] <= 1e-4
        assert Shape(**{k: r[k] for k in Shape.__dataclass_fields__}) == shapes[r["step"]]


def test_resume_across_a_cut_equals_uninterrupted(progressive, tmp_path):
    stopped = pipeline.run(TINY, output=tmp_path, overrides=SLIMMED, stop_after=3, register=False)
    assert stopped.summary == {"stopped_at": 3}
    cuts = [r for r in read_metrics(stopped.run_dir / "metrics.jsonl") if r.get("event") == "slim"]
    assert cuts  # it stopped after a cut, with pruning still ahead
    resumed = pipeline.resume(stopped.run_dir)
    a = load_file(progressive.run_dir / "model" / "model.safetensors")
    b = load_file(resumed.run_dir / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    plan = json.loads((resumed.run_dir / "plan.json").read_text())
    assert plan == json.loads((progressive.run_dir / "plan.json").read_text())


def test_the_check_after_a_cut_fails_on_a_wrong_cut_and_on_nan():
    from compressor.checks import check_progressive_slim
    from compressor.errors import CheckFailed

    model = tiny_bert(seed=5)
    first, _ = two_cuts(5)
    cut = Units.kept(first)
    ids, att = tiny_batch()
    with torch.no_grad():
        masked = encode(model, ids, att, first)
        cut_model = copy.deepcopy(model)
        cut_student(cut_model, cut, FULL.head_dim)
        good = encode(cut_model, ids, att, cut_masks(first, cut))
        assert check_progressive_slim(masked, good, cut.hidden, att, 7) <= 1e-5
        wrong = Units.kept(replace(first, hidden=first.hidden.roll(1)))  # other hidden dims
        with pytest.raises(CheckFailed, match="progressive slim at step 7"):
            check_progressive_slim(masked, good, wrong.hidden, att, 7)
        good.hidden_states[-1][0, 0, 0] = float("nan")
        with pytest.raises(CheckFailed):
            check_progressive_slim(masked, good, cut.hidden, att, 7)


def test_progressive_slimming_prunes_head_dims(tmp_path):
    """A cut student is scored at its own head size: with head dims in the target (32 -> 16), every
    event after the first cut once failed (a 32-wide score against 24-wide removed sums)."""
    head_dims = [*SLIMMED, "target.hidden=64", "target.heads=4",
                 "pruning.structures=[layers,heads,head_dims,ffn,hidden]"]  # fmt: skip
    res = pipeline.run(TINY, output=tmp_path, overrides=head_dims, register=False)
    assert res.summary["student_shape"]["head_dim"] == 16
    cuts = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if r.get("event") == "slim"]
    assert len(cuts) > 2 and all(r["masked_vs_slim_max_abs"] <= 1e-4 for r in cuts)
    assert res.summary["checks"]["masked_vs_slim_max_abs"] <= 1e-4
