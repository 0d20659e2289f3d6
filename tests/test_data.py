"""Training text: packing into full sequences, pack: false unchanged, streams that loop over epochs
and resume from a saved position without reading what came before it."""

import hashlib
import io
import random

import numpy as np
import pytest
import torch
import yaml

from compressor import packing, pipeline
from compressor.checkpoint import load_checkpoint
from compressor.data import Corpus
from compressor.errors import DataError
from compressor.packing import pack, pack_texts, unpack
from compressor.recipe import (
    DataSpec,
    load_recipe,
    load_run_recipe,
    parse_recipe,
    recipe_to_dict,
)
from tests.helpers import RECIPES, fake_texts, small_recipe, small_teacher

CLS, SEP = 101, 102


def joined(docs, sep=SEP, carry=()) -> list[int]:
    out = list(carry)
    for d in docs:
        if d:
            out += [sep, *d] if out else list(d)
    return out


# ---------------------------------------------------------------------------- packing (pure)


@pytest.mark.parametrize("seed", range(5))
def test_pack_fills_every_sequence_and_loses_no_token(seed):
    rng = random.Random(seed)
    docs = [
        [rng.randint(200, 999) for _ in range(rng.choice([0, 1, 5, 13, 40]))] for _ in range(30)
    ]
    carry = [rng.randint(200, 999) for _ in range(rng.randint(0, 5))]
    seqs, left = pack(docs, 16, CLS, SEP, carry)
    assert seqs.shape[1] == 16 and len(seqs) > 0
    assert (seqs[:, 0] == CLS).all() and (seqs[:, -1] == SEP).all()
    assert len(left) < 16 - 2
    assert unpack(seqs, left) == joined(docs, carry=carry)  # every token, in order


def test_batched_tokenisation_packs_the_same_as_one_call(packaged_tokenizer, monkeypatch):
    texts = fake_texts(23, longest=40)
    whole = pack_texts(packaged_tokenizer, texts, 24)
    monkeypatch.setattr(packing, "TOKENIZE_BATCH", 4)
    batched = pack_texts(packaged_tokenizer, texts, 24)
    assert np.array_equal(whole[0], batched[0]) and whole[1] == batched[1]
    ids = packaged_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert unpack(*batched) == joined(ids, packaged_tokenizer.sep_token_id)


# ---------------------------------------------------------------------------- in-memory corpora


def files_spec(tmp_path, texts, **kw) -> DataSpec:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts) + "\n")
    base = dict(source="files", files=(str(path),), max_length=24, heldout=3, quality_texts=2)
    return DataSpec(**{**base, **kw})


def test_an_in_memory_corpus_packs_every_training_token(tmp_path, packaged_tokenizer):
    tok = packaged_tokenizer
    texts = fake_texts(40)
    corpus = Corpus(files_spec(tmp_path, texts), tok, seed=0, batch_size=4, accum=1)
    seqs = np.asarray(corpus.train_ids)
    assert seqs.shape[1] == 24 and (seqs[:, 0] == tok.cls_token_id).all()
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
    train = [texts[i] for i in order][5:]  # after the 3 held-out and 2 quality texts
    stream = joined(tok(train, add_special_tokens=False)["input_ids"], tok.sep_token_id)
    used = unpack(seqs)
    assert used == stream[: len(used)] and len(stream) - len(used) < 22  # only the last carry
    batch = next(corpus.batches(3))[0]
    assert batch.input_ids.shape == (4, 24) and bool(batch.attention_mask.all())
    # held-out texts stay one text each, truncated, as before
    held = [texts[i] for i in order][:3]
    assert corpus.heldout_texts == held
    want = tok(held, truncation=True, max_length=24)["input_ids"]
    got = [r[m.bool()].tolist() for r, m in zip(corpus.heldout.input_ids,
                                               corpus.heldout.attention_mask, strict=True)]  # fmt: skip
    assert got == want


# sha256 of the held-out batch, the batches of steps 0, 1, 7, 199, 650, 5000 and the quality texts,
# computed with the code before data.pack existed (commit 8339f6a)
BEFORE = {
    "minilm-to-4L256": "719b36b3220cbbe9aacdf47aeda9fbdde4ee63f09f7c51b1c84fca266535a167",
    "compare-minilm-4L256": "2ffc258eb8ae9643dd4b06a11df2ef9ef86b440a65c5bccad759c17b8475e4a1",
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_pack_false_gives_the_batches_of_before_bit_for_bit(name, packaged_tokenizer):
    r = load_recipe(RECIPES / f"{name}.yaml")
    assert r.data.pack is False
    corpus = Corpus(
        r.data, packaged_tokenizer, r.train.seed, r.train.batch_size, r.train.grad_accum
    )
    h = hashlib.sha256()
    for step in [None, 0, 1, 7, 199, 650, 5000]:
        for b in [corpus.heldout] if step is None else next(corpus.batches(step)):
            h.update(b.input_ids.numpy().tobytes())
            h.update(b.attention_mask.numpy().tobytes())
    h.update(repr(corpus.quality_texts).encode())
    assert h.hexdigest() == BEFORE[name]


def test_a_run_recipe_written_before_data_pack_resumes_unpacked(tmp_path):
    raw = recipe_to_dict(load_recipe(RECIPES / "tiny-test.yaml"))
    del raw["data"]["pack"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert load_run_recipe(tmp_path).data.pack is False
    assert load_recipe(RECIPES / "tiny-test.yaml").data.pack is True  # new recipes pack


# ---------------------------------------------------------------------------- streams


def stream_corpus(tmp_path, tok, n=60, batch_size=4, **kw) -> Corpus:
    spec = files_spec(tmp_path, fake_texts(n), **{"streaming": True, "shuffle_buffer": 8, **kw})
    return Corpus(spec, tok, seed=0, batch_size=batch_size, accum=1)


def steps(corpus: Corpus, start: int, n: int) -> list[torch.Tensor]:
    it = corpus.batches(start)
    return [next(it)[0].input_ids for _ in range(n)]


@pytest.mark.parametrize("pack", [True, False])
def test_a_stream_loops_over_epochs(tmp_path, packaged_tokenizer, pack):
    corpus = stream_corpus(tmp_path, packaged_tokenizer, n=12, pack=pack)
    batches = steps(corpus, 0, 40)  # 7 training texts: several epochs
    assert len(batches) == 40
    pos = corpus.reader.position(40)
    assert pos.epoch >= 3
    # each epoch reads the 7 training texts again, never the 5 held-out ones
    seen = {w for b in batches for t in packaged_tokenizer.batch_decode(b) for w in t.split()}
    assert {f"doc{i}" for i in range(5, 12)} <= seen
    assert not {t.split()[0] for t in corpus.heldout_texts} & seen


def test_an_epoch_is_shuffled_differently_and_holds_every_training_text(
    tmp_path, packaged_tokenizer
):
    tok = packaged_tokenizer
    corpus = stream_corpus(tmp_path, tok, n=25, pack=False, batch_size=10, shuffle_buffer=100)
    first, second = steps(corpus, 0, 4)[:2], steps(corpus, 2, 2)  # 20 texts: epochs of 20
    names = [[s.split()[1] for s in tok.batch_decode(torch.cat(e))] for e in (first, second)]
    assert sorted(names[0]) == sorted(names[1]) and len(set(names[0])) == 20
    assert names[0] != names[1]


@pytest.mark.parametrize("pack", [True, False])
def test_resume_gives_the_same_batches_without_reading_the_skipped_texts(
    tmp_path, packaged_tokenizer, pack
):
    tok = packaged_tokenizer
    full = stream_corpus(tmp_path, tok, n=400, pack=pack)
    want = steps(full, 0, 60)
    for k in (10, 50):
        saved = full.position(k)
        buf = io.BytesIO()  # what a checkpoint stores, loaded as a checkpoint is
        torch.save({"data": saved}, buf)
        saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["data"]
        resumed = stream_corpus(tmp_path, tok, n=400, pack=pack)
        resumed.restore(k, saved)
        got = steps(resumed, k, 1)
        assert resumed.reader.stream.texts_read <= 3 * 8  # a window or two and the one ahead
        got += steps(resumed, k + 1, 60 - k - 1)
        assert all(torch.equal(a, b) for a, b in zip(want[k:], got, strict=True))


def test_the_probes_may_read_ahead_and_the_loop_still_gets_every_step(tmp_path, packaged_tokenizer):
    tok = packaged_tokenizer
    want = steps(stream_corpus(tmp_path, tok), 0, 30)
    corpus = stream_corpus(tmp_path, tok)
    loop, got = corpus.batches(0), []
    for s in range(30):
        if s % 5 == 0:  # a pruning step: the probe reads this step and a few after it
            probe = steps(corpus, s, 3 if s < 20 else 20)
            assert all(torch.equal(a, b) for a, b in zip(probe, want[s:], strict=False))
        got.append(next(loop)[0].input_ids)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_a_stream_without_a_position_cannot_resume_past_its_start(tmp_path, packaged_tokenizer):
    corpus = stream_corpus(tmp_path, packaged_tokenizer)
    with pytest.raises(DataError, match="no stream position"):
        corpus.restore(5, None)


def test_a_stream_with_only_held_out_text_is_a_data_error(tmp_path, packaged_tokenizer):
    corpus = stream_corpus(tmp_path, packaged_tokenizer, n=5)
    with pytest.raises(DataError, match="no training text"):
        next(corpus.batches(0))


@pytest.mark.parametrize(
    "row,field,needle",
    [('{"text": 5}', "text", "a 'text' is 5, not a string"),
     ('{"text": "x"}', "body", "'body' is not a column")],
)  # fmt: skip
def test_a_bad_stream_row_is_a_data_error(tmp_path, packaged_tokenizer, row, field, needle):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(f'{{"text": "t{i}"}}\n' for i in range(6)) + row + "\n")
    spec = DataSpec(source="files", files=(str(path),), streaming=True, heldout=3,
                    quality_texts=2, text_field=field)  # fmt: skip
    with pytest.raises(DataError, match=needle):
        next(Corpus(spec, packaged_tokenizer, seed=0, batch_size=2, accum=1).batches(0))


# ---------------------------------------------------------------------------- through the loop


def test_a_streamed_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(
    tmp_path, packaged_tokenizer
):
    (tmp_path / "c.txt").write_text("\n".join(fake_texts(300)) + "\n")
    raw = recipe_to_dict(small_recipe(steps=8))
    raw["data"].update(source="files", files=[str(tmp_path / "c.txt")], streaming=True,
                       shuffle_buffer=16)  # fmt: skip
    raw["pruning"].update(end_step=5, interval=1, probe_batches=2)
    recipe = parse_recipe(raw)
    tok = packaged_tokenizer
    a = pipeline.run(recipe, tmp_path / "a", small_teacher(tok), stop_after=6, register=False)
    b = pipeline.run(recipe, tmp_path / "b", small_teacher(tok), stop_after=3, register=False)
    assert load_checkpoint(b.run_dir).data["offset"] > 0  # mid-window: the position matters
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
