"""A mixture of text sources (data.sources): reproducible under the seed, weights respected,
resumed exactly from a checkpoint's position, bad sources refused by name; the single-source form
unchanged."""

import io
import random

import numpy as np
import pytest
import torch

from compressor import pipeline
from compressor.checkpoint import load_checkpoint
from compressor.data import Corpus, read_convention_speeches
from compressor.errors import DataError, RecipeError
from compressor.mixture import BLOCK, choices, shares
from compressor.recipe import DataSpec, load_recipe, parse_recipe, recipe_to_dict
from tests.helpers import RECIPES, small_recipe, small_teacher

WORDS = ["the", "of", "and", "in", "river", "city", "was", "born", "king", "music", "war", "north"]
WEIGHT_TOLERANCE = 0.03  # |observed share - weight share| over N_DRAWS sequences (3 binomial sd)
N_DRAWS = 2000


def write_texts(path, prefix: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{prefix}{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
             for i in range(n)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def sources(tmp_path, weights=(3.0, 1.0)):
    """Two local sources: a file of `a` texts, and a folder holding two files of `b` texts."""
    write_texts(tmp_path / "a.txt", "aa", 300)
    write_texts(tmp_path / "b" / "one.txt", "bb", 80, seed=1)
    write_texts(tmp_path / "b" / "deeper" / "two.txt", "bc", 80, seed=2)
    return [{"source": "files", "files": [str(tmp_path / "a.txt")], "weight": weights[0]},
            {"source": "files", "files": [str(tmp_path / "b")], "weight": weights[1]}]  # fmt: skip


def corpus(tmp_path, tok, seed=0, streaming=False, weights=(3.0, 1.0), pack=False, batch=8):
    spec = DataSpec(sources=sources(tmp_path, weights), streaming=streaming, pack=pack,
                    max_length=16, heldout=4, quality_texts=4, shuffle_buffer=32)  # fmt: skip
    return Corpus(spec, tok, seed=seed, batch_size=batch, accum=1)


def steps(c: Corpus, start: int, n: int) -> list[torch.Tensor]:
    it = c.batches(start)
    return [next(it)[0].input_ids for _ in range(n)]


def names(tok, batches) -> list[str]:
    return [t.split()[0] for b in batches for t in tok.batch_decode(b, skip_special_tokens=True)]


def test_shares_and_draws_are_pure_functions():
    assert shares(32, [3, 1]) == [24, 8] and shares(5, [1, 1, 1]) == [2, 2, 1]
    assert sum(shares(7, [0.2, 0.3, 0.5])) == 7
    a, b = choices(0, 3, [3, 1]), choices(0, 3, [3, 1])
    assert len(a) == BLOCK and np.array_equal(a, b)
    assert not np.array_equal(a, choices(1, 3, [3, 1]))
    assert not np.array_equal(a, choices(0, 4, [3, 1]))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_mixture_is_reproducible_and_respects_its_weights(
    tmp_path, packaged_tokenizer, streaming
):
    """Same seed: the same texts in the same order; another seed: another order. Over N_DRAWS
    sequences each source's share is its weight's within WEIGHT_TOLERANCE; texts come from both
    files of the folder; the held-out texts are shared by weight and never trained on."""
    tok = packaged_tokenizer
    first = names(tok, steps(corpus(tmp_path, tok, streaming=streaming), 0, N_DRAWS // 8))
    again = names(tok, steps(corpus(tmp_path, tok, streaming=streaming), 0, N_DRAWS // 8))
    other = names(tok, steps(corpus(tmp_path, tok, seed=1, streaming=streaming), 0, 20))
    assert first == again and first[:160] != other
    share_a = sum(n.startswith("aa") for n in first) / len(first)
    assert len(first) == N_DRAWS and abs(share_a - 0.75) < WEIGHT_TOLERANCE
    assert {n[:2] for n in first} == {"aa", "bb", "bc"}
    c = corpus(tmp_path, tok, streaming=streaming)
    held = [t.split()[0] for t in c.heldout_texts + c.quality_texts]
    assert sorted(n[:1] * 2 for n in held) == ["aa"] * 6 + ["bb"] * 2  # 3:1 of 4 + 4
    assert not set(held) & set(first)
    skewed = names(tok, steps(corpus(tmp_path, tok, streaming=streaming, weights=(1, 3)), 0, 100))
    assert abs(sum(n.startswith("aa") for n in skewed) / len(skewed) - 0.25) < 0.05


@pytest.mark.parametrize("streaming,pack", [(False, False), (True, False), (True, True)])
def test_a_mixture_resumes_exactly_from_a_saved_position(
    tmp_path, packaged_tokenizer, streaming, pack
):
    """Stop at step k, save the corpus position as a checkpoint does, restore it in a new corpus:
    the continuation equals the uninterrupted stream, past the end of an epoch of a source."""
    tok = packaged_tokenizer
    want = steps(corpus(tmp_path, tok, streaming=streaming, pack=pack), 0, 70)
    for k in (7, 45):
        saved = corpus(tmp_path, tok, streaming=streaming, pack=pack).position(0)
        c = corpus(tmp_path, tok, streaming=streaming, pack=pack)
        steps(c, 0, k)
        buf = io.BytesIO()  # what a checkpoint stores, loaded as a checkpoint is
        torch.save({"data": c.position(k)}, buf)
        saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["data"]
        assert saved["mixture"] == 8 * k
        resumed = corpus(tmp_path, tok, streaming=streaming, pack=pack)
        resumed.restore(k, saved)
        got = steps(resumed, k, 70 - k)
        assert all(torch.equal(a, b) for a, b in zip(want[k:], got, strict=True))


def test_a_mixed_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(
    tmp_path, packaged_tokenizer
):
    """Through the training loop: the importance probes and the steps read the mixture, and a
    run stopped at step 3 and resumed ends step 6 where an uninterrupted run does."""
    raw = recipe_to_dict(small_recipe(steps=8))
    raw["data"] = {**raw["data"], "source": None, "sources": sources(tmp_path / "text"), "pack": False,
                   "streaming": True, "shuffle_buffer": 16}  # fmt: skip
    raw["pruning"].update(end_step=5, interval=1, probe_batches=2)
    recipe = parse_recipe(raw)
    tok = packaged_tokenizer
    a = pipeline.run(recipe, tmp_path / "a", small_teacher(tok), stop_after=6, register=False)
    b = pipeline.run(recipe, tmp_path / "b", small_teacher(tok), stop_after=3, register=False)
    assert load_checkpoint(b.run_dir).data["mixture"] > 0
    pipeline.resume(b.run_dir, stop_after=6, teacher=small_teacher(tok), register=False)
    sa, sb = load_checkpoint(a.run_dir), load_checkpoint(b.run_dir)
    assert sa.step == sb.step == 6 and sa.data == sb.data
    assert_same(sa.masks, sb.masks)
    assert_same(sa.student, sb.student)


def assert_same(x, y, where="") -> None:
    if isinstance(x, torch.Tensor):
        assert x.shape == y.shape and torch.allclose(x.float(), y.float(), atol=1e-6), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_same(x[k], y[k], f"{where}.{k}")
    else:
        assert x == y, where


def mixed_recipe(data_sources, **data):
    raw = recipe_to_dict(small_recipe())
    raw["data"] = {**raw["data"], "source": None, "sources": data_sources, **data}
    return parse_recipe(raw)


@pytest.mark.parametrize(
    "data_sources,data,needle",
    [
        ([{"source": "magic"}], {}, r"data\.sources\.0\.source"),
        ([{"source": "wiki_summaries", "weight": 0}], {}, r"data\.sources\.0\.weight"),
        ([{"source": "wiki_summaries"}, {"source": "hub"}], {},
         r"data\.sources\[1\]\.name: required when data\.sources\[1\]\.source is 'hub'"),
        ([{"source": "files"}], {}, r"data\.sources\[0\]\.files: required"),
        ([{"source": "wiki_summaries", "files": ["x.txt"]}], {},
         r"data\.sources\[0\]\.files: only for data\.sources\[0\]\.source 'files'"),
        ([{"source": "wiki_summaries", "colour": 1}], {}, r"data\.sources\.0\.colour"),
        ([{"source": "wiki_summaries"}], {"source": "wiki_summaries"}, "name the text twice"),
        ([], {}, r"name a text source \(data\.source\) or several"),
    ],
)  # fmt: skip
def test_a_bad_source_is_a_recipe_error_naming_it(data_sources, data, needle):
    with pytest.raises(RecipeError, match=needle):
        mixed_recipe(data_sources, **data)


def test_a_missing_file_or_empty_folder_is_a_data_error_naming_the_source(
    tmp_path, packaged_tokenizer
):
    (tmp_path / "empty").mkdir()
    bad = {"source": "files", "files": [str(tmp_path / "nope.txt")]}
    spec = DataSpec(sources=[{"source": "convention_speeches"}, bad], heldout=3, quality_texts=0)
    with pytest.raises(DataError, match=r"data\.sources\[1\] \(files\): data\.files: not found"):
        Corpus(spec, packaged_tokenizer, 0, 2, 1)
    empty = {"source": "files", "files": [str(tmp_path / "empty")]}
    spec = DataSpec(sources=[empty], heldout=3, quality_texts=0)
    with pytest.raises(DataError, match=r"data\.sources\[0\] \(files\): .* holds no"):
        Corpus(spec, packaged_tokenizer, 0, 2, 1)


def test_the_single_source_form_is_unchanged_and_the_mix_recipe_mixes_packaged_text():
    default = load_recipe(RECIPES / "minilm-to-4L256.yaml")
    assert default.data.source == "wiki_summaries" and default.data.sources == ()
    mix = load_recipe(RECIPES / "minilm-to-4L256-mix.yaml")
    assert mix.data.source is None
    assert {s.source for s in mix.data.sources} == {"wiki_summaries", "convention_speeches"}
    assert mix.model_copy(update={"data": default.data, "name": default.name}) == default
    speeches = read_convention_speeches()
    assert len(speeches) > 2500 and all(len(p.split()) >= 8 for p in speeches)
