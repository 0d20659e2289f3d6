"""Every supported family, on tiny random models built from stock transformers configs: the
masked forward is the stock forward, masked == slimmed under sharp attention, the slimmed model
reloads with AutoModel and computes the same, a progressive cut computes what the masks do, and
the ONNX export verifies in onnxruntime. MPNet's shared relative-position bias keeps the same
heads in every layer."""

import copy
import json
from dataclasses import replace

import onnxruntime as ort
import pytest
import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    CamembertConfig,
    DistilBertConfig,
    MPNetConfig,
    RobertaConfig,
    XLMRobertaConfig,
)
from transformers import AutoModelForMaskedLM as MaskedLM

from compressor.arch import KNOWN_MODEL_TYPES, architecture_for
from compressor.checks import check_param_count, check_slim_roundtrip
from compressor.data import Batch
from compressor.deploy.export import export_onnx, save_samples
from compressor.deploy.verify import Tolerance, verify_export
from compressor.errors import TeacherError
from compressor.forward import encode, encode_without_each
from compressor.prune.importance import magnitudes, structure_scores
from compressor.prune.masks import Masks, prune_to, select_layers
from compressor.prune.progressive import Units, cut_masks, cut_student
from compressor.prune.slim import PrunePlan, save_slim_model, slim
from compressor.recipe import TeacherSpec
from compressor.rundir import ONNX_FILE
from compressor.shapes import Shape, Vocab, config_has_mlm_head
from compressor.teacher import checked_config, load_teacher, read_teacher_config

FULL = Shape(3, 32, 4, 8, 64)
TARGET = Shape(2, 12, 2, 6, 24)  # every kind pruned: layers, hidden, heads, head dims, FFN
SIZES = dict(vocab_size=120, max_position_embeddings=40)
BERT_LIKE = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip
DISTIL_LIKE = dict(dim=32, n_layers=3, n_heads=4, hidden_dim=64, dropout=0.0, attention_dropout=0.0)
# family (and variant) -> its stock config at FULL's shape
CONFIGS = {
    "bert": lambda **kw: BertConfig(**BERT_LIKE, **kw),
    "roberta": lambda **kw: RobertaConfig(**BERT_LIKE, type_vocab_size=1, **kw),
    "xlm-roberta": lambda **kw: XLMRobertaConfig(**BERT_LIKE, type_vocab_size=1, **kw),
    "camembert": lambda **kw: CamembertConfig(**BERT_LIKE, type_vocab_size=1, **kw),
    "distilbert": lambda **kw: DistilBertConfig(**DISTIL_LIKE, **kw),
    "distilbert-sinusoidal": lambda **kw: DistilBertConfig(
        **DISTIL_LIKE, sinusoidal_pos_embds=True, **kw
    ),
    "mpnet": lambda **kw: MPNetConfig(**BERT_LIKE, **kw),
}
FAMILIES = list(CONFIGS)
TOL = Tolerance(atol=1e-4, rtol=1e-4, min_agreement=0.9999)
TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "Rain falls."]


def tiny(family: str, mlm: bool = False, seed: int = 0, sharp: float = 1.0, **kw):
    """A seeded tiny model of `family` (random LayerNorm affine, so masked-LayerNorm bugs show;
    word embeddings as large as sinusoidal positions; Q and K scaled by `sharp`, so attention is
    sharp and a wrong attention scale shows)."""
    torch.manual_seed(seed)
    cfg = CONFIGS[family](**{**SIZES, **kw})
    cls = MaskedLM if mlm else AutoModel
    model = cls.from_config(cfg, attn_implementation="eager")
    model.config.architectures = [type(model).__name__]
    arch = architecture_for(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n or "layer_norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
        arch.embeddings(model).word.weight.normal_(0, 1.0)
        table = arch.relative_bias(model)
        if table is not None:  # a bias that matters (and differs per head)
            table.weight.normal_(0, 1.0)
        for i in range(arch.num_layers(model)):
            t = arch.layer(model, i)
            for lin in (t.q, t.k):
                lin.weight.mul_(sharp)
                lin.bias.mul_(sharp)
    return model.eval()


def pad_id(model) -> int:
    return model.config.pad_token_id or 0


def batch_for(model, batch: int = 3, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, seq), generator=g)
    att = torch.ones_like(ids)
    att[0, seq - 4 :] = 0  # padding in one row
    ids[att == 0] = pad_id(model)
    return ids, att


def real(x, att):
    return x[att.bool()]


def random_masks(model, seed: int, target: Shape = TARGET) -> Masks:
    """Random structure scores cut to `target`; for a family with shared heads, every layer's
    head scores are the same (as importance.structure_scores makes them)."""
    g = torch.Generator().manual_seed(seed)
    s = {
        "hidden": torch.rand(32, generator=g), "heads": torch.rand(3, 4, generator=g),
        "qk": torch.rand(3, 4, 8, generator=g), "vo": torch.rand(3, 4, 8, generator=g),
        "ffn": torch.rand(3, 64, generator=g),
    }  # fmt: skip
    if architecture_for(model).shared_heads:
        s["heads"] = s["heads"][0].expand(3, 4).clone()
    m = prune_to(Masks.full(FULL), s, target)
    kept = select_layers(torch.rand(3, generator=g), target.layers, "sensitivity")
    return replace(m, layers=kept, fade=kept.float())


@pytest.mark.parametrize("mlm", [False, True], ids=["encoder", "mlm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_masks_reproduce_the_stock_forward(family, mlm):
    model = tiny(family, mlm=mlm)
    ids, att = batch_for(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=att, output_hidden_states=True)
        out = encode(model, ids, att, Masks.full(FULL), with_logits=mlm)
    for want, got in zip(ref.hidden_states, out.hidden_states, strict=True):
        assert (real(want, att) - real(got, att)).abs().max() < 1e-5
    if mlm:
        assert (real(ref.logits, att) - real(out.logits, att)).abs().max() < 1e-4


@pytest.mark.parametrize("mlm", [False, True], ids=["encoder", "mlm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_slimmed_with_sharp_attention(family, mlm):
    """The tolerance of BERT's own test (test_forward_and_slim), every structure kind pruned."""
    model = tiny(family, mlm=mlm, sharp=40.0)
    masks = random_masks(model, 0)
    plan = PrunePlan.from_masks(masks, FULL)
    assert plan.shape == TARGET
    small = slim(model, plan)
    ids, att = batch_for(model)
    with torch.no_grad():
        masked = encode(model, ids, att, masks, with_logits=mlm)
        got = small(input_ids=ids, attention_mask=att, output_hidden_states=True)
    row_max = torch.stack([p.amax(-1) for p in masked.attentions])  # [L, B, H, T]
    assert row_max.permute(1, 3, 0, 2)[att.bool()].max() > 0.9  # really sharp
    for new_i, old_i in enumerate([0] + [i + 1 for i in plan.layers]):
        want = masked.hidden_states[old_i][..., masks.hidden]
        assert (real(got.hidden_states[new_i], att) - real(want, att)).abs().max() < 2e-5
    if mlm:
        assert (real(got.logits, att) - real(masked.logits, att)).abs().max() < 1e-4


def family_tokenizer(model, packaged_tokenizer, where):
    """The packaged WordPiece vocabulary saved with the family's model inputs (a family without
    token types takes none), loaded back as a user's tokenizer would be."""
    packaged_tokenizer.save_pretrained(where)
    cfg_file = where / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    if architecture_for(model).embeddings(model).token_type is None:
        cfg["model_input_names"] = ["input_ids", "attention_mask"]
    cfg_file.write_text(json.dumps(cfg))
    return AutoTokenizer.from_pretrained(where)


@pytest.mark.parametrize("mlm", [False, True], ids=["encoder", "mlm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_removal_round_computes_what_fading_each_layer_out_does(family, mlm):
    """The greedy layer removal's shortcut (encode_without_each: the layers before a candidate
    run once, faded-out layers not at all) gives bit for bit `encode` with that layer's fade at
    0, for every candidate: with every layer kept, and with one already out and widths pruned."""
    model = tiny(family, mlm=mlm, sharp=40.0)
    ids, att = batch_for(model)
    for masks in (Masks.full(FULL), random_masks(model, 1)):
        with torch.no_grad():
            got = encode_without_each(model, ids, att, masks, with_logits=mlm)
            assert sorted(got) == masks.layers.nonzero().flatten().tolist()
            for i, out in got.items():
                kept = masks.layers.clone()
                kept[i] = False
                trial = replace(masks, layers=kept, fade=kept.to(masks.fade))
                want = encode(model, ids, att, trial, with_logits=mlm)
                assert torch.equal(out.hidden_states[-1], want.hidden_states[-1])
                if mlm:
                    assert torch.equal(out.logits, want.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_slim_save_reload_with_automodel(family, tmp_path, packaged_tokenizer):
    model = tiny(family, seed=1, sharp=5.0)
    masks = random_masks(model, 1)
    small = slim(model, PrunePlan.from_masks(masks, FULL))
    tok = family_tokenizer(model, packaged_tokenizer, tmp_path / "tok")
    save_slim_model(small, tok, {}, tmp_path / "model")
    reloaded = AutoModel.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.model_type == model.config.model_type
    assert type(reloaded) is type(model)
    ids, att = batch_for(model)
    diff = check_slim_roundtrip(model, masks, tmp_path / "model", Batch(ids, att))
    assert diff < 1e-5
    # the parameter count is the closed form's for the family
    n = check_param_count(small, TARGET, Vocab.of_config(model.config), mlm_head=False)
    assert n == sum(p.numel() for p in reloaded.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_progressive_cut_computes_what_the_masks_do(family):
    model = tiny(family, seed=2, sharp=20.0)
    masks = random_masks(model, 2, Shape(3, 24, 2, 6, 48))  # all layers stay: one cut
    cut = Units.kept(masks)
    cut_model = copy.deepcopy(model)
    cut_student(cut_model, cut, FULL.head_dim)
    ids, att = batch_for(model)
    with torch.no_grad():
        want = encode(model, ids, att, masks).hidden_states[-1][..., masks.hidden]
        got = encode(cut_model, ids, att, cut_masks(masks, cut)).hidden_states[-1]
    assert (real(got, att) - real(want, att)).abs().max() < 2e-5


@pytest.mark.parametrize("exporter", ["optimum", "torch.onnx"])
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_verifies_in_onnxruntime(family, exporter, tmp_path, packaged_tokenizer,
                                             monkeypatch):  # fmt: skip
    """optimum's exporter, and the torch.onnx fallback (the family's own model inputs: no token
    types where it has none)."""
    if exporter == "torch.onnx":
        import optimum.exporters.onnx as optimum_onnx

        def broken(*args, **kwargs):
            raise RuntimeError("simulated exporter failure")

        monkeypatch.setattr(optimum_onnx, "main_export", broken)
    model = tiny(family, seed=3, vocab_size=packaged_tokenizer.vocab_size,
                 max_position_embeddings=64)  # fmt: skip
    masks = random_masks(model, 3)
    small = slim(model, PrunePlan.from_masks(masks, FULL))
    model_dir, onnx_dir = tmp_path / "model", tmp_path / "onnx"
    tok = family_tokenizer(model, packaged_tokenizer, tmp_path / "tok")
    save_slim_model(small, tok, {}, model_dir)
    report = export_onnx(model_dir, onnx_dir)
    assert report["exporter"].startswith(exporter), report["exporter"]
    save_samples(onnx_dir, model_dir, TEXTS, (1, 3), (8, 32))
    r = verify_export(onnx_dir, ONNX_FILE, TOL)
    assert r.passed, r.failures
    # and the graph computes what the masked teacher did (the adapter's forward)
    ids, att = batch_for(model)
    sess = ort.InferenceSession(str(onnx_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": att, "token_type_ids": torch.zeros_like(ids)}
    names = [i.name for i in sess.get_inputs()]
    (got,) = sess.run(["last_hidden_state"], {n: feed[n].numpy() for n in names})
    with torch.no_grad():
        want = encode(model, ids, att, masks).hidden_states[-1][..., masks.hidden]
    assert (real(torch.from_numpy(got), att) - real(want, att)).abs().max() < 1e-4


def test_mpnet_scores_keep_the_same_heads_in_every_layer():
    """MPNet's relative-position bias is one table for all layers: head scores are global, and
    pruning by them keeps the same heads in every layer, so the slimmed model is stock."""
    model = tiny("mpnet", seed=4)
    entry = magnitudes(dict(model.named_parameters()))
    scores = structure_scores(model, entry, FULL.head_dim)
    assert torch.equal(scores["heads"], scores["heads"][0].expand(3, 4))
    masks = prune_to(Masks.full(FULL), scores, Shape(3, 32, 2, 8, 64))
    assert all(torch.equal(row, masks.heads[0]) for row in masks.heads)
    # the table's own column is part of a head's score
    table = architecture_for(model).relative_bias(model).weight
    entry[next(n for n, p in model.named_parameters() if p is table)][:, 3] += 1e6
    assert int(structure_scores(model, entry, FULL.head_dim)["heads"][0].argmax()) == 3


def test_mpnet_refuses_a_plan_with_different_heads_per_layer():
    model = tiny("mpnet")
    heads = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]]).bool()  # 2 per layer
    hidden = torch.arange(32) < 16  # 2 heads x 8 dims
    masks = replace(Masks.full(FULL), heads=heads, hidden=hidden)
    plan = PrunePlan.from_masks(masks, FULL)
    with pytest.raises(ValueError, match="same heads"):
        slim(model, plan)
    with pytest.raises(ValueError, match="same heads"):
        cut_student(copy.deepcopy(model), Units.kept(masks), FULL.head_dim)


def test_an_unknown_family_is_refused_with_the_known_ones():
    with pytest.raises(TeacherError) as err:
        checked_config({"model_type": "gpt2"}, "config.json")
    assert "'gpt2'" in str(err.value)
    assert all(t in str(err.value) for t in KNOWN_MODEL_TYPES)
    assert set(KNOWN_MODEL_TYPES) >= {"bert", "roberta", "xlm-roberta", "camembert",
                                      "distilbert", "mpnet"}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_config_sizes_are_read_through_the_adapter(family):
    cfg = tiny(family).config
    assert Shape.of_config(cfg) == Shape.of_config(cfg.to_dict()) == FULL
    checked = checked_config(cfg.to_dict(), "config.json")
    assert Shape.of_config(checked) == FULL


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("with_head", [False, True], ids=["no-head-tensors", "head"])
def test_a_masked_lm_config_without_head_tensors_is_the_bare_encoder(
    with_head, safetensors, tmp_path, packaged_tokenizer
):
    """all-mpnet-base-v2's config says MPNetForMaskedLM but its checkpoint has no `lm_head`: the
    teacher is the bare encoder (a random head would be distilled from), in the recipe check as
    in the loaded model (a .bin checkpoint is only known once loaded; the recipe check then
    trusts the config). A checkpoint with the head keeps it."""
    tiny("mpnet", mlm=with_head).save_pretrained(tmp_path, safe_serialization=safetensors)
    packaged_tokenizer.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["MPNetForMaskedLM"]})
    )
    spec = TeacherSpec(source="local", id=str(tmp_path))
    assert config_has_mlm_head(read_teacher_config(spec)) is (with_head or not safetensors)
    teacher = load_teacher(spec)
    assert teacher.has_mlm_head is with_head
    assert type(teacher.model).__name__ == ("MPNetForMaskedLM" if with_head else "MPNetModel")
