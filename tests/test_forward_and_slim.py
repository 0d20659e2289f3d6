"""The masked forward is the stock forward at step 0, and equals the slimmed model afterwards."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModel

from compressor.forward import encode
from compressor.prune.masks import Masks, prune_to, select_layers
from compressor.prune.slim import PrunePlan, save_slim_model, slim
from compressor.shapes import Shape, Vocab, param_count
from tests.helpers import sharp_tiny_bert, tiny_batch, tiny_bert

FULL = Shape(3, 32, 4, 8, 64)


def real(x, att):
    return x[att.bool()]


@pytest.mark.parametrize("mlm", [False, True])
def test_full_masks_reproduce_the_stock_forward(mlm):
    model = tiny_bert(mlm=mlm)
    ids, att = tiny_batch()
    with torch.no_grad():
        ref = model(
            input_ids=ids, attention_mask=att, output_hidden_states=True, output_attentions=True
        )
        out = encode(model, ids, att, Masks.full(FULL), with_logits=mlm)
    last = ref.hidden_states[-1]
    assert (real(last, att) - real(out.hidden_states[-1], att)).abs().max() < 1e-5
    if mlm:
        assert (real(ref.logits, att) - real(out.logits, att)).abs().max() < 1e-4


def random_masks(seed: int, target: Shape) -> Masks:
    g = torch.Generator().manual_seed(seed)
    scores = {
        "hidden": torch.rand(32, generator=g), "heads": torch.rand(3, 4, generator=g),
        "qk": torch.rand(3, 4, 8, generator=g), "vo": torch.rand(3, 4, 8, generator=g),
        "ffn": torch.rand(3, 64, generator=g),
    }  # fmt: skip
    m = prune_to(Masks.full(FULL), scores, target)
    kept = select_layers(torch.rand(3, generator=g), target.layers, "sensitivity")
    return replace(m, layers=kept, fade=kept.float())


@pytest.mark.parametrize("mlm", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_equals_slimmed(mlm, seed, tmp_path, packaged_tokenizer):
    model = tiny_bert(mlm=mlm, seed=seed)
    target = Shape(2, 12, 2, 6, 24)  # head dims 8 -> 6, heads 4 -> 2, hidden 32 -> 12
    masks = random_masks(seed, target)
    plan = PrunePlan.from_masks(masks, FULL)
    assert plan.shape == target
    small = slim(model, plan)
    ids, att = tiny_batch()
    with torch.no_grad():
        masked = encode(model, ids, att, masks, with_logits=mlm)
        got = small(input_ids=ids, attention_mask=att, output_hidden_states=True)
    want = masked.hidden_states[-1][..., masks.hidden]
    assert (real(got.hidden_states[-1], att) - real(want, att)).abs().max() < 1e-5
    if mlm:
        assert (real(got.logits, att) - real(masked.logits, att)).abs().max() < 1e-4

    # save, reload with the stock class, same outputs; parameter count = formula
    save_slim_model(small, packaged_tokenizer, {}, tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids, attention_mask=att).last_hidden_state
    assert (real(again, att) - real(want, att)).abs().max() < 1e-5
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.hidden_size == 12
    n = sum(p.numel() for p in small.parameters())
    assert n == param_count(target, Vocab(120, 40, 2), pooler=not mlm, mlm_head=mlm)


@pytest.mark.parametrize("mlm", [False, True])
@pytest.mark.parametrize(
    "target", [Shape(3, 24, 4, 6, 64), Shape(2, 12, 2, 6, 24)], ids=["dims", "dims+heads"]
)
def test_masked_equals_slimmed_with_sharp_attention(mlm, target):
    """Head dims 8 -> 6 under sharp attention: only the sqrt(6/8) folded into Q makes the slimmed
    model's 1/sqrt(6) scale reproduce the masked forward's 1/sqrt(8) scores. (With the nearly
    uniform attention of `tiny_bert` a wrong scale barely moves the outputs.)"""
    model = sharp_tiny_bert(mlm=mlm)
    masks = random_masks(0, target)
    plan = PrunePlan.from_masks(masks, FULL)
    assert plan.shape == target
    small = slim(model, plan)
    ids, att = tiny_batch()
    with torch.no_grad():
        masked = encode(model, ids, att, masks, with_logits=mlm)
        got = small(input_ids=ids, attention_mask=att, output_hidden_states=True)
    # the attention really is sharp: some real query row puts > 0.9 on a single key
    row_max = torch.stack([p.amax(-1) for p in masked.attentions])  # [L, B, H, T]
    assert row_max.permute(1, 3, 0, 2)[att.bool()].max() > 0.9
    for new_i, old_i in enumerate([0] + [i + 1 for i in plan.layers]):
        want = masked.hidden_states[old_i][..., masks.hidden]
        assert (real(got.hidden_states[new_i], att) - real(want, att)).abs().max() < 2e-5
    if mlm:
        assert (real(got.logits, att) - real(masked.logits, att)).abs().max() < 1e-4


def test_fading_layer_is_identity_at_gate_zero():
    model = tiny_bert()
    ids, att = tiny_batch()
    m = Masks.full(FULL)
    dropped = replace(
        m, layers=torch.tensor([True, False, True]), fade=torch.tensor([1.0, 0.0, 1.0])
    )
    with torch.no_grad():
        out = encode(model, ids, att, dropped)
    assert torch.equal(out.hidden_states[2], out.hidden_states[1])


def test_plan_json_roundtrip():
    plan = PrunePlan.from_masks(random_masks(3, Shape(2, 12, 2, 6, 24)), FULL)
    assert PrunePlan.from_json(plan.to_json()) == plan


def test_plan_refuses_a_layer_still_fading():
    m = Masks.full(FULL)
    m = replace(m, layers=torch.tensor([True, False, True]), fade=torch.tensor([1.0, 0.3, 1.0]))
    with pytest.raises(ValueError, match="still fading"):
        PrunePlan.from_masks(m, FULL)


@pytest.mark.parametrize(
    "shape,expected",
    [(Shape(12, 768, 12, 64, 3072), 109_482_240), (Shape(6, 384, 12, 32, 1536), 22_713_216)],
)
def test_param_count_matches_reference_sizes(shape, expected):
    assert param_count(shape, Vocab()) == expected
