import torch

from compressor.importance import (
    EmaState,
    entry_scores,
    structure_scores,
    update_state,
    with_magnitude_fallback,
)
from tests.conftest import tiny_bert


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


def test_magnitude_fallback_only_where_sensitivity_is_blind():
    sens = {"ffn": torch.zeros(2, 3), "hidden": torch.tensor([0.0, 1.0])}
    mag = {"ffn": torch.ones(2, 3), "hidden": torch.tensor([5.0, 0.0])}
    out = with_magnitude_fallback(sens, lambda: mag)
    assert torch.equal(out["ffn"], mag["ffn"]) and torch.equal(out["hidden"], sens["hidden"])


def test_state_is_blind_until_a_gradient_is_non_zero():
    p = torch.nn.Parameter(torch.ones(3))
    state = EmaState.zeros_like({"p": p})
    p.grad = torch.zeros(3)  # the student equals the teacher: loss at its minimum
    update_state(state, {"p": p}, "sensitivity", 0.85, 0.95)
    assert state.is_blind()
    p.grad = torch.tensor([0.0, 1e-3, 0.0])
    update_state(state, {"p": p}, "sensitivity", 0.85, 0.95)
    assert not state.is_blind()


def test_magnitude_is_not_computed_when_sensitivity_sees():
    def boom():
        raise AssertionError("magnitude scores computed although no kind was blind")

    sens = {"ffn": torch.ones(2, 3)}
    assert with_magnitude_fallback(sens, boom) is sens
