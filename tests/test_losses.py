"""Loss terms against hand-computed values, and their assembly by `loss_terms`."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from compressor.data import Batch
from compressor.forward import EncoderOutput, encode
from compressor.losses import (
    Correspondence,
    HiddenMaps,
    attention_kl,
    embedding_cosine,
    hidden_mse,
    loss_terms,
    mlm_cross_entropy,
    prediction_kl,
    representation_cosine,
    similarity_mse,
    weighted_total,
)
from compressor.prune.masks import Masks
from compressor.recipe import DistillSpec
from compressor.shapes import Shape
from tests.helpers import tiny_batch, tiny_bert


def rand_probs(*shape, seed=0, sharpness=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * sharpness).softmax(-1)


# ---------------------------------------------------------------------------- hidden_mse


def test_hidden_mse_zero_at_identity():
    x = torch.randn(2, 5, 4)
    att = torch.ones(2, 5, dtype=torch.long)
    assert hidden_mse(x, x.clone(), att).item() == 0.0


def test_hidden_mse_known_value_and_padding_ignored():
    t = torch.zeros(2, 3, 2)
    s = torch.zeros(2, 3, 2)
    s[0, 0] = torch.tensor([1.0, 3.0])  # per-token mean sq: (1 + 9) / 2 = 5
    s[1, 1] = torch.tensor([2.0, 0.0])  # (4 + 0) / 2 = 2
    att = torch.tensor([[1, 1, 0], [1, 1, 1]])  # 5 real tokens
    assert hidden_mse(s, t, att).item() == pytest.approx((5 + 2) / 5)
    s[0, 2] = 1e3  # a padding token: must not count
    assert hidden_mse(s, t, att).item() == pytest.approx((5 + 2) / 5)


# ---------------------------------------------------------------------------- attention_kl


def hand_attention_kl(t, s, alive, att):
    """KL(t || s) per (batch, alive head, real query), averaged over alive heads, then over the
    real queries, in plain loops."""
    total, n = 0.0, 0
    heads = [h for h in range(t.shape[1]) if alive[h]]
    for b in range(t.shape[0]):
        for q in range(t.shape[2]):
            if not att[b, q]:
                continue
            per_head = []
            for h in heads:
                tp, sp = t[b, h, q].double(), s[b, h, q].double()
                per_head.append(float((tp * (tp.log() - sp.log())).sum()))
            total += sum(per_head) / len(heads)
            n += 1
    return total / n


def test_attention_kl_zero_at_identity():
    t = rand_probs(2, 3, 4, 4)
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert attention_kl(t, t.clone(), torch.ones(3, dtype=torch.bool), att).item() == 0.0


def test_attention_kl_hand_value_alive_heads_real_queries():
    t = rand_probs(2, 3, 4, 4, seed=0)
    s = rand_probs(2, 3, 4, 4, seed=1)
    alive = torch.tensor([True, False, True])
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    got = attention_kl(t, s, alive, att).item()
    assert got > 0
    assert got == pytest.approx(hand_attention_kl(t, s, alive, att), rel=1e-5)


def test_attention_kl_ignores_dead_heads_and_padding_queries():
    t = rand_probs(2, 3, 4, 4, seed=0)
    s = rand_probs(2, 3, 4, 4, seed=1)
    alive = torch.tensor([True, False, True])
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ref = attention_kl(t, s, alive, att)
    garbage = s.clone()
    garbage[:, 1] = rand_probs(2, 4, 4, seed=2, sharpness=30.0)  # the dead head's rows
    garbage[0, :, 3] = rand_probs(3, 4, seed=3, sharpness=30.0)  # a padding query's rows
    assert torch.equal(attention_kl(t, garbage, alive, att), ref)
    # an alive head's garbage does count
    garbage[:, 2] = rand_probs(2, 4, 4, seed=4, sharpness=30.0)
    assert attention_kl(t, garbage, alive, att) > ref + 0.1


# ---------------------------------------------------------------------------- representation


def test_representation_cosine_zero_at_identity():
    x = torch.randn(3, 5, 8)
    att = torch.ones(3, 5, dtype=torch.long)
    att[0, 3:] = 0
    assert abs(representation_cosine(x, x.clone(), att).item()) < 1e-6


def test_representation_cosine_known_value_and_padding_ignored():
    # row 0: pooled student [1, 0], teacher [1, 1] -> 1 - 1/sqrt(2); row 1: equal -> 0
    s = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [-50.0, 7.0]], [[1.0, 2.0], [3.0, 4.0], [0, 0]]])
    t = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [9.0, -9.0]], [[2.0, 4.0], [6.0, 8.0], [0, 0]]])
    att = torch.tensor([[1, 1, 0], [1, 1, 0]])
    want = (1 - 1 / math.sqrt(2) + 0.0) / 2
    assert representation_cosine(s, t, att).item() == pytest.approx(want, abs=1e-6)
    s[:, 2] = torch.tensor([123.0, -4.0])  # padding tokens of every row
    assert representation_cosine(s, t, att).item() == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------- similarity


def test_similarity_mse_hand_value_padding_ignored_and_map_free():
    # pooled student rows [1, 0], [0, 1], [1, 1]; teacher rows [1, 0], [1, 0], [0, 1] (3 dims:
    # the widths may differ). Student cosines (0, 1), (0, 2), (1, 2): 0, 1/sqrt2, 1/sqrt2;
    # teacher: 1, 0, 0.
    s = torch.tensor([[[2.0, 0.0], [9.0, 9.0]], [[0.0, 3.0], [9.0, 9.0]], [[1.0, 1.0], [1, 1]]])
    t = torch.tensor([[[1.0, 0, 0], [0, 0, 0]], [[4.0, 0, 0], [0, 0, 0]], [[0, 5.0, 0], [0, 5, 0]]])
    att = torch.tensor([[1, 0], [1, 0], [1, 1]])
    want = ((0 - 1) ** 2 + (1 / math.sqrt(2)) ** 2 * 2) / 3
    assert similarity_mse(s, t, att).item() == pytest.approx(want, abs=1e-6)
    s[:2, 1] = torch.tensor([-70.0, 3.0])  # padding tokens
    assert similarity_mse(s, t, att).item() == pytest.approx(want, abs=1e-6)


def test_similarity_mse_zero_for_the_same_geometry_in_other_coordinates():
    """A rotated, rescaled student has the teacher's geometry; a shuffled one does not."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 4, 8, generator=g)
    att = torch.ones(6, 4, dtype=torch.long)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    rotated = 3.0 * t @ q
    assert similarity_mse(rotated, t, att).item() < 1e-10
    assert similarity_mse(t[torch.randperm(6, generator=g)], t, att).item() > 1e-2


def test_loss_terms_similarity_on_the_unmapped_final_state():
    """The similarity term reads the student's own last state, not the learned map of it."""
    t = hand_outputs(seed=0)
    s = copy.deepcopy(t)
    maps = HiddenMaps(4, 8)
    with torch.no_grad():
        maps.maps[3].weight.mul_(-5.0).add_(torch.randn(8, 8))  # a map that scrambles
    d = DistillSpec(hidden=0.0, attention=0.0, prediction=0.0, similarity=1.0)
    out = loss_terms(d, t, s, maps, Masks.full(SHAPE), hand_batch())
    assert set(out) == {"similarity"}
    assert out["similarity"].item() < 1e-10
    s.hidden_states[3] = s.hidden_states[3].flip(0)  # swap the two texts' final states
    s.hidden_states[3][1] = s.hidden_states[3][1] * torch.linspace(-1, 1, 8)
    out = loss_terms(d, t, s, maps, Masks.full(SHAPE), hand_batch())
    assert out["similarity"].item() > 1e-3
    assert weighted_total(d.model_copy(update={"similarity": 2.0}), out).item() == pytest.approx(
        2 * out["similarity"].item()
    )


def test_embedding_cosine_is_map_free_and_in_the_kept_coordinates():
    """The embedding term compares the student's own pooled final state with the teacher's in
    the dims the student keeps: 0 when they agree there, whatever the teacher has elsewhere; the
    same value for a masked student and for the slimmed one that holds only the kept dims."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 8, generator=g)
    att = torch.ones(3, 5, dtype=torch.long)
    att[2, 3:] = 0
    alive = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    masked = t * alive  # a masked student that matches the teacher in its kept dims
    assert embedding_cosine(t, t, torch.ones(8, dtype=torch.bool), att).item() < 1e-6
    assert embedding_cosine(masked, t, alive, att).item() < 1e-6
    rotated = t @ torch.linalg.qr(torch.randn(8, 8, generator=g))[0]  # same geometry, other coords
    assert embedding_cosine(rotated, t, torch.ones(8, dtype=torch.bool), att).item() > 0.1
    kept = alive.nonzero().flatten()
    student = torch.randn(3, 5, 8, generator=g) * alive
    slimmed = student[..., kept]
    assert embedding_cosine(slimmed, t, torch.ones(5, dtype=torch.bool), att, kept).item() == (
        pytest.approx(embedding_cosine(student, t, alive, att).item(), abs=1e-6)
    )


def test_loss_terms_embedding_reads_the_kept_teacher_dims_of_a_slimmed_student():
    t = hand_outputs(seed=0)
    d = DistillSpec(hidden=0.0, attention=0.0, prediction=0.0, embedding=1.0)
    dims = torch.tensor([0, 2, 3, 5, 6])
    s = copy.deepcopy(t)
    s.hidden_states = [h[..., dims] for h in t.hidden_states]
    masks = Masks.full(Shape(3, 5, 2, 4, 16))
    c = Correspondence(layers=[0, 1, 2], heads=[torch.arange(2)] * 3, hidden=dims)
    out = loss_terms(d, t, s, HiddenMaps(4, 8), masks, hand_batch(), c)
    assert set(out) == {"embedding"} and out["embedding"].item() < 1e-6
    c = Correspondence(layers=[0, 1, 2], heads=[torch.arange(2)] * 3, hidden=dims.flip(0))
    assert loss_terms(d, t, s, HiddenMaps(4, 8), masks, hand_batch(), c)["embedding"] > 1e-3


# ---------------------------------------------------------------------------- prediction / mlm


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_prediction_kl_is_teacher_to_student_times_t_squared(temperature):
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(2, 4, 6, generator=g) * 3.0
    s_logits = torch.randn(2, 4, 6, generator=g) * 0.5  # far flatter: KL is asymmetric here
    positions = torch.tensor([[True, False, True, False], [False, False, True, True]])
    got = prediction_kl(t_logits, s_logits, positions, temperature).item()

    def kl(p_logits, q_logits):  # KL(p || q) per selected position, then the mean
        rows = []
        for b, i in positions.nonzero().tolist():
            p = (p_logits[b, i].double() / temperature).softmax(-1)
            q = (q_logits[b, i].double() / temperature).softmax(-1)
            rows.append(float((p * (p.log() - q.log())).sum()))
        return sum(rows) / len(rows) * temperature**2

    want, reverse = kl(t_logits, s_logits), kl(s_logits, t_logits)
    assert abs(want - reverse) > 0.1 * want  # the example tells the directions apart
    assert got == pytest.approx(want, rel=1e-5)


def test_prediction_kl_ignores_unselected_positions_and_is_zero_when_none():
    t_logits = torch.randn(2, 3, 5)
    s_logits = torch.randn(2, 3, 5)
    positions = torch.tensor([[True, False, False], [False, True, False]])
    ref = prediction_kl(t_logits, s_logits, positions, 1.0)
    s2 = s_logits.clone()
    s2[~positions] = 100.0 * torch.randn(int((~positions).sum()), 5)
    assert torch.equal(prediction_kl(t_logits, s2, positions, 1.0), ref)
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert prediction_kl(t_logits, s_logits, none, 1.0).item() == 0.0


def test_mlm_cross_entropy_ignores_minus_100():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    labels = torch.tensor([[4, -100, 1], [-100, -100, 6]])
    want = (
        -(
            logits[0, 0].log_softmax(-1)[4]
            + logits[0, 2].log_softmax(-1)[1]
            + logits[1, 2].log_softmax(-1)[6]
        )
        / 3
    )
    assert mlm_cross_entropy(logits, labels).item() == pytest.approx(want.item(), rel=1e-6)
    logits2 = logits.clone()
    logits2[labels == -100] = 50.0 * torch.randn(3, 7, generator=g)
    assert torch.equal(mlm_cross_entropy(logits2, labels), mlm_cross_entropy(logits, labels))


# ---------------------------------------------------------------------------- loss_terms

SHAPE = Shape(layers=3, hidden=8, heads=2, head_dim=4, ffn=16)


def hand_outputs(seed: int = 0, logits: bool = False) -> EncoderOutput:
    """An EncoderOutput with 4 clearly distinct hidden states (embeddings + 3 layers)."""
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(2, 5, 8, generator=g) + 3.0 * i for i in range(4)]
    att = [(torch.randn(2, 2, 5, 5, generator=g) * 2.0).softmax(-1) for _ in range(3)]
    lg = torch.randn(2, 5, 11, generator=g) if logits else None
    return EncoderOutput(hidden, att, lg)


def hand_batch(labels: bool = False) -> Batch:
    att = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    ids = torch.arange(10).view(2, 5) + 5
    lab = torch.tensor([[7, -100, -100, 9, -100], [-100, 3, -100, -100, -100]]) if labels else None
    return Batch(ids, att, lab)


def removing_middle_layer() -> Masks:
    m = Masks.full(SHAPE)
    return replace(m, layers=torch.tensor([True, False, True]), fade=torch.tensor([1.0, 0.0, 1.0]))


def test_loss_terms_compare_student_state_i_with_teacher_state_i_of_kept_layers():
    """Layer 1 is removed: the student's state 2 (its output) and attentions 1 are garbage.
    Only states [0, 1, 3] and attentions [0, 2] are compared, state i with teacher state i."""
    t = hand_outputs(seed=0)
    s = copy.deepcopy(t)
    g = torch.Generator().manual_seed(7)
    s.hidden_states[2] = torch.randn(2, 5, 8, generator=g) * 10
    s.attentions[1] = (torch.randn(2, 2, 5, 5, generator=g) * 10).softmax(-1)
    d = DistillSpec(hidden=1.0, attention=1.0, prediction=0.0)
    out = loss_terms(d, t, s, HiddenMaps(4, 8), removing_middle_layer(), hand_batch())
    assert set(out) == {"hidden", "attention"}
    assert out["hidden"].item() == 0.0
    assert out["attention"].item() == 0.0


def test_loss_terms_hidden_average_over_the_mapped_states():
    """A known error on one kept state: the term is that state's MSE / number of mapped states."""
    t = hand_outputs(seed=0)
    s = copy.deepcopy(t)
    s.hidden_states[3] = s.hidden_states[3] + 2.0  # MSE 4 on the last kept layer's output
    s.attentions[2] = rand_probs(2, 2, 5, 5, seed=5)
    batch, masks = hand_batch(), removing_middle_layer()
    d = DistillSpec(hidden=1.0, attention=1.0, prediction=0.0)
    out = loss_terms(d, t, s, HiddenMaps(4, 8), masks, batch)
    assert out["hidden"].item() == pytest.approx(4.0 / 3, rel=1e-6)  # states 0, 1, 3
    kl2 = attention_kl(t.attentions[2], s.attentions[2], masks.heads[2], batch.attention_mask)
    assert out["attention"].item() == pytest.approx(kl2.item() / 2, rel=1e-6)  # layers 0, 2


def test_loss_terms_a_shifted_student_is_not_zero():
    """If the student's states were one layer ahead of the teacher's, the loss must see it."""
    t = hand_outputs(seed=0)
    s = copy.deepcopy(t)
    s.hidden_states = [*t.hidden_states[1:], t.hidden_states[-1]]
    d = DistillSpec(hidden=1.0, attention=0.0, prediction=0.0)
    out = loss_terms(d, t, s, HiddenMaps(4, 8), removing_middle_layer(), hand_batch())
    assert out["hidden"].item() > 1.0


def test_loss_terms_zero_at_identity_mlm():
    model = tiny_bert(mlm=True)
    ids, att = tiny_batch()
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 3], labels[2, 0] = 7, 11, 42
    batch = Batch(ids, att, labels)
    masks = Masks.full(Shape(3, 32, 4, 8, 64))
    with torch.no_grad():
        t = encode(model, ids, att, masks, with_logits=True)
        s = encode(copy.deepcopy(model), ids, att, masks, with_logits=True)
        d = DistillSpec(mlm=1.0, prediction=1.0, hidden=1.0, attention=1.0, temperature=2.0)
        out = loss_terms(d, t, s, HiddenMaps(4, 32), masks, batch)
    assert set(out) == {"hidden", "attention", "prediction", "mlm"}
    for k in ("hidden", "attention", "prediction"):
        assert out[k].item() == 0.0, k
    assert torch.equal(out["mlm"], mlm_cross_entropy(s.logits, labels))
    assert torch.equal(weighted_total(d, out), out["mlm"])


def test_loss_terms_zero_at_identity_headless():
    model = tiny_bert()
    ids, att = tiny_batch()
    batch = Batch(ids, att)
    masks = Masks.full(Shape(3, 32, 4, 8, 64))
    with torch.no_grad():
        t = encode(model, ids, att, masks)
        s = encode(copy.deepcopy(model), ids, att, masks)
        d = DistillSpec(mlm=0.0, prediction=1.0, hidden=1.0, attention=1.0)
        out = loss_terms(d, t, s, HiddenMaps(4, 32), masks, batch)
    assert set(out) == {"hidden", "attention", "prediction"}
    assert out["hidden"].item() == 0.0
    assert out["attention"].item() == 0.0
    assert abs(out["prediction"].item()) < 1e-6  # 1 - cosine: exact up to float rounding


# ---------------------------------------------------------------------------- frozen embeddings


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_word_embeddings_get_gradients_but_do_not_move(frozen):
    """Importance still scores hidden dims from the word embeddings' gradient; AdamW skips them."""
    from compressor.bert_params import student_parameters
    from compressor.recipe import load_recipe, with_overrides
    from compressor.train.state import make_optimizer
    from tests.helpers import RECIPES

    recipe = with_overrides(
        load_recipe(RECIPES / "tiny-test.yaml"), [f"train.freeze_word_embeddings={frozen}"]
    )
    model = tiny_bert()
    params = student_parameters(model)
    optimizer = make_optimizer(params, HiddenMaps(4, 32), recipe)
    words = model.embeddings.word_embeddings.weight
    before, other = words.detach().clone(), model.embeddings.position_embeddings.weight
    other_before = other.detach().clone()
    ids, att = tiny_batch()
    encode(model, ids, att).hidden_states[-1].pow(2).mean().backward()
    assert words.grad is not None and words.grad.abs().sum() > 0
    optimizer.step()
    assert torch.equal(words.detach(), before) == frozen
    assert not torch.equal(other.detach(), other_before)
