from dataclasses import replace

import torch
from hypothesis import given
from hypothesis import strategies as st

from compressor.prune.masks import Masks, keep_top_k, prune_to, select_layers, zero_pruned_weights
from compressor.shapes import Shape
from tests.helpers import tiny_bert


@given(st.lists(st.floats(-5, 5), min_size=4, max_size=20), st.data())
def test_keep_top_k_only_shrinks(values, data):
    scores = torch.tensor(values)
    alive = torch.tensor(
        data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    )
    k = data.draw(st.integers(0, len(values)))
    kept = keep_top_k(scores, alive, k)
    assert not (kept & ~alive).any()  # never revives a dead entry
    assert int(kept.sum()) == min(k, int(alive.sum()))


def test_keep_top_k_keeps_the_best_per_row():
    scores = torch.tensor([[1.0, 5.0, 3.0, 4.0], [9.0, 0.0, 8.0, 7.0]])
    kept = keep_top_k(scores, torch.ones(2, 4, dtype=torch.bool), 2)
    assert kept.tolist() == [[False, True, False, True], [True, False, True, False]]


def test_prune_to_is_uniform_and_monotone():
    s = Shape(3, 32, 4, 8, 64)
    m = Masks.full(s)
    g = torch.Generator().manual_seed(0)

    def scores():
        return {
            "hidden": torch.rand(32, generator=g), "heads": torch.rand(3, 4, generator=g),
            "qk": torch.rand(3, 4, 8, generator=g), "vo": torch.rand(3, 4, 8, generator=g),
            "ffn": torch.rand(3, 64, generator=g),
        }  # fmt: skip

    a = prune_to(m, scores(), Shape(3, 24, 3, 6, 40))
    b = prune_to(a, scores(), Shape(3, 16, 2, 4, 20))
    assert a.widths() == Shape(3, 24, 3, 6, 40)
    assert b.widths() == Shape(3, 16, 2, 4, 20)
    assert (b.ffn.sum(1) == 20).all() and (b.heads.sum(1) == 2).all() and (b.qk.sum(2) == 4).all()
    assert b.is_subset_of(a) and a.is_subset_of(m) and not m.is_subset_of(a)


def test_uniform_layer_selection_is_evenly_spaced():
    assert select_layers(torch.zeros(12), 6, "uniform").nonzero().flatten().tolist() == [
        1,
        3,
        5,
        7,
        9,
        11,
    ]
    kept = select_layers(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2, "sensitivity")
    assert kept.tolist() == [False, True, False, True]


def test_zero_pruned_weights_moves_coupled_tensors_together():
    model = tiny_bert()
    s = Shape(3, 32, 4, 8, 64)
    m = Masks.full(s)
    ffn = m.ffn.clone()
    ffn[1, 5] = False
    hidden = m.hidden.clone()
    hidden[7] = False
    heads = m.heads.clone()
    heads[2, 1] = False
    m = replace(m, ffn=ffn, hidden=hidden, heads=heads)
    zero_pruned_weights(model, m)
    layer = model.encoder.layer
    assert (layer[1].intermediate.dense.weight[5] == 0).all()
    assert layer[1].intermediate.dense.bias[5] == 0
    assert (layer[1].output.dense.weight[:, 5] == 0).all()
    assert (layer[0].intermediate.dense.weight[5] != 0).any()  # other layers untouched
    assert (model.embeddings.word_embeddings.weight[:, 7] == 0).all()
    assert (layer[0].attention.self.query.weight[:, 7] == 0).all()
    assert (layer[2].output.dense.weight[7] == 0).all()
    assert model.encoder.layer[2].output.LayerNorm.weight[7] == 0
    head_rows = slice(8, 16)  # head 1 of 4, head_dim 8
    for lin in ("query", "key", "value"):
        assert (getattr(layer[2].attention.self, lin).weight[head_rows] == 0).all()
    assert (layer[2].attention.output.dense.weight[:, head_rows] == 0).all()
