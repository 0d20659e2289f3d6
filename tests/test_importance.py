import pytest
import torch

from compressor.prune.importance import (
    EmaState,
    entry_scores,
    noise_floor,
    signal_margins,
    structure_scores,
    update_state,
)
from tests.helpers import tiny_bert


def test_structure_scores_sum_every_coupled_tensor():
    model = tiny_bert()  # D=32, I=64, 4 heads of 8, vocab 120, 40 positions, 2 types, pooler
    entry = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    s = structure_scores(model, entry, head_dim=8)
    assert torch.all(s["ffn"] == 32 + 1 + 32)  # intermediate row + bias + output column
    assert torch.all(s["qk"] == 2 * (32 + 1))  # Q row + bias, K row + bias
    assert torch.all(s["vo"] == (32 + 1) + 32)  # V row + bias, O column
    assert torch.all(s["heads"] == 8 * (66 + 65))
    emb = 120 + 40 + 2 + 2
    layer = (
        3 * 32 + 64 + (32 + 1) + (64 + 1) + 4
    )  # Q/K/V cols, inter cols, O row+b, out row+b, 2 LN
    pool = 32 + 32 + 1
    assert torch.all(s["hidden"] == emb + 3 * layer + pool)


def test_ema_and_uncertainty():
    p = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    state = EmaState.zeros_like({"p": p})
    p.grad = torch.tensor([0.5, 0.0])
    update_state(state, {"p": p}, "sensitivity", 0.5, 0.5)
    assert torch.allclose(state.i_bar["p"], torch.tensor([0.5, 0.0]))  # 0.5 * |2 * 0.5|
    assert torch.allclose(state.u_bar["p"], torch.tensor([0.25, 0.0]))  # 0.5 * |1 - 0.5|
    assert torch.allclose(entry_scores(state, True)["p"], torch.tensor([0.125, 0.0]))
    assert torch.allclose(entry_scores(state, False)["p"], torch.tensor([0.5, 0.0]))


def test_noise_floor_is_the_largest_noise_score_per_kind():
    noise = {"ffn": torch.tensor([[1e-9, 3e-9], [2e-9, 0.0]]), "hidden": torch.tensor([5e-8])}
    assert noise_floor(noise) == pytest.approx({"ffn": 3e-9, "hidden": 5e-8})


def test_margin_is_the_median_alive_score_over_the_floor():
    scores = {"ffn": torch.tensor([[1.0, 2.0, 3.0, 1e6]]), "heads": torch.tensor([[4.0, 4.0]])}
    alive = {"ffn": torch.tensor([[True, True, True, False]])}  # the pruned 1e6 does not count
    floor = {"ffn": 0.01, "heads": 0.0}
    m = signal_margins(scores, floor, alive)
    assert m["ffn"] == pytest.approx(200.0)  # median 2 over floor 0.01
    assert m["heads"] == float("inf")  # a floor of exactly 0: any signal clears it
    assert signal_margins({"heads": torch.zeros(1, 2)}, {"heads": 0.0}, {})["heads"] == 0.0


def test_mean_importance_removes_the_ema_start_up_bias():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    state = EmaState.zeros_like({"p": p})
    for _ in range(3):
        p.grad = torch.tensor([0.5])  # |theta * grad| = 1 every time
        update_state(state, {"p": p}, "sensitivity", 0.85, 0.95)
    assert float(state.i_bar["p"]) == pytest.approx(1 - 0.85**3)
    assert float(state.mean_importance(0.85)["p"]) == pytest.approx(1.0)
    state.reset()
    assert state.steps == 0 and float(state.i_bar["p"]) == 0.0


def test_hidden_scores_leave_out_layers_being_removed():
    model = tiny_bert()
    entry = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    every = structure_scores(model, entry, head_dim=8)["hidden"]
    kept = structure_scores(model, entry, 8, torch.tensor([True, False, True]))["hidden"]
    layer = 3 * 32 + 64 + (32 + 1) + (64 + 1) + 4  # what one layer adds to each hidden dim
    assert torch.all(every - kept == layer)


def test_structure_scores_hidden_includes_the_mlm_head_transform():
    model = tiny_bert(mlm=True)  # no pooler; decoder weight tied to the word embeddings
    entry = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    s = structure_scores(model, entry, head_dim=8)
    assert torch.all(s["ffn"] == 32 + 1 + 32)
    assert torch.all(s["heads"] == 8 * (66 + 65))
    emb = 120 + 40 + 2 + 2
    layer = 3 * 32 + 64 + (32 + 1) + (64 + 1) + 4
    transform = 32 + 32 + 1 + 2  # dense row + column + bias, LayerNorm weight + bias
    assert torch.all(s["hidden"] == emb + 3 * layer + transform)


def test_structure_scores_hidden_sees_each_mlm_transform_entry():
    """Distinct scores on the transform only: the hidden score of dim d is exactly its row,
    its column and its bias of the dense, plus its LayerNorm weight and bias."""
    model = tiny_bert(mlm=True)
    entry = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    names = [n for n in entry if ".transform." in n]
    assert len(names) == 4  # dense.weight, dense.bias, LayerNorm.weight, LayerNorm.bias
    for n in names:
        entry[n] = torch.rand(entry[n].shape, generator=g)
    pre = "cls.predictions.transform."
    w = entry[pre + "dense.weight"]
    want = (
        w.sum(0)
        + w.sum(1)
        + entry[pre + "dense.bias"]
        + entry[pre + "LayerNorm.weight"]
        + entry[pre + "LayerNorm.bias"]
    )
    s = structure_scores(model, entry, head_dim=8)
    assert torch.allclose(s["hidden"], want)
    assert not s["ffn"].any() and not s["qk"].any() and not s["vo"].any()
