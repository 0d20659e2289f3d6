"""Downstream evaluation: task splits, the linear probe, fine-tuning on a tiny model, and
`compress eval` on a real run and on a zoo entry."""

import json
import random
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, BertModel

from compressor.cli.main import main
from compressor.errors import DataError
from compressor.evaluate.downstream import (
    evaluate_encoder,
    finetune,
    linear_probe,
    relevant_ranks,
    retrieval_metrics,
)
from compressor.evaluate.evaluation import evaluate_dir
from compressor.evaluate.settings import EvalSettings
from compressor.evaluate.tasks import (
    Queries,
    RetrievalTask,
    Split,
    Task,
    group_split,
    load_task,
    stratified_split,
    subsample,
)
from compressor.zoo import store as zoo

# ---------------------------------------------------------------------------- splits


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=300), st.integers(0, 10))
def test_subsample_is_exact_and_a_subset(labels, seed):
    split = Split([(str(i), None) for i in range(len(labels))], labels)
    n = max(1, len(labels) // 3)
    sub = subsample(split, n, seed)
    assert len(sub) == n and set(sub.texts) <= set(split.texts)
    assert subsample(split, n, seed) == sub


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=300), st.integers(0, 10))
def test_stratified_split_partitions_and_keeps_proportions(labels, seed):
    train, val, test = stratified_split(labels, (0.6, 0.2, 0.2), seed)
    assert sorted(train + val + test) == list(range(len(labels)))
    for y in set(labels):
        n = labels.count(y)
        in_val = sum(labels[i] == y for i in val)
        assert abs(in_val - 0.2 * n) <= 0.5 + 1e-9


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from("abcdefghij"), min_size=1, max_size=200), st.integers(0, 10))
def test_group_split_never_puts_a_group_in_two_splits(groups, seed):
    parts = group_split(groups, (0.7, 0.1, 0.2), seed)
    assert sorted(i for p in parts for i in p) == list(range(len(groups)))
    seen = [{groups[i] for i in p} for p in parts]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_offline_tasks_load_with_disjoint_splits():
    wiki = load_task("wiki_topics")
    assert wiki.num_labels == 11 and "Uncategorized" not in wiki.label_names
    assert len(wiki.train) + len(wiki.validation) + len(wiki.test) == 10033 - 1000
    assert not {t for t, _ in wiki.test.texts} & {t for t, _ in wiki.train.texts}
    rt = load_task("rotten_tomatoes")
    assert rt.label_names == ["rotten", "fresh"]
    assert len(rt.train) + len(rt.validation) + len(rt.test) == 12808  # fresh + rotten
    small = load_task("rotten_tomatoes", max_train=300, max_eval=100)
    assert len(small.train) == 300 and len(small.test) == 100
    assert set(small.train.texts) <= set(rt.train.texts)


def test_movie_retrieval_splits_queries_by_film_and_keeps_every_plot():
    task = load_task("movie_retrieval")
    assert len(task.corpus) == 1083 and len(set(task.corpus)) == len(task.corpus)
    assert all(task.corpus)  # no empty plot
    films = [set(q.relevant) for q in (task.validation, task.test)]
    assert films[0] and films[1] and not films[0] & films[1]  # no film in both splits
    assert len(task.validation) + len(task.test) > 3000
    small = load_task("movie_retrieval", max_eval=100)
    assert len(small.test) == 100 and set(small.test.texts) <= set(task.test.texts)
    assert load_task("movie_retrieval", max_eval=100) == small  # seeded


def test_local_csv_with_named_columns(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [
        f"review {i} {'great' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}" for i in range(50)
    ]
    path.write_text("body,verdict\n" + "\n".join(rows))
    task = load_task(str(path), text_column="body", label_column="verdict")
    assert task.label_names == ["neg", "pos"] and len(task.train) == 36
    with pytest.raises(DataError, match=r"no column 'text'.*--text-column"):
        load_task(str(path))


def test_unknown_task_and_bad_cli_input_exit_2_without_traceback(tiny_run):
    res = CliRunner().invoke(main, ["eval", str(tiny_run.run_dir), "--task", "imdb"])
    assert res.exit_code == 2 and "unknown task 'imdb'" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(main, ["eval", "no/such/entry", "--task", "wiki_topics"])
    assert res.exit_code == 2 and "no/such/entry" in res.output


# ---------------------------------------------------------------------------- the two evaluators


def test_relevant_ranks_and_retrieval_metrics():
    docs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    queries = torch.tensor([[1.0, 0.1], [1.0, 0.1], [0.0, 2.0], [0.6, 0.6]])
    ranks = relevant_ranks(queries, docs, torch.tensor([0, 1, 1, 2]))
    assert ranks.tolist() == [1, 3, 1, 1]
    # a tie counts against the relevant document
    assert relevant_ranks(torch.ones(1, 2), torch.ones(3, 2), torch.tensor([1])).tolist() == [3]
    m = retrieval_metrics(torch.tensor([1, 3, 11, 2]))
    assert m["recall@1"] == 0.25
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 0 + 1 / 1.5849625) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 2) / 4)


def test_retrieval_ranks_by_meaning_with_a_real_encoder(packaged_teacher):
    """The packaged sentence encoder finds paraphrases; a randomly initialised one does not."""
    docs = ["The cat sat on the mat.", "Stock markets fell sharply today.",
            "He cooked pasta for dinner.", "The rocket launched into orbit."]  # fmt: skip
    queries = ["A kitten was sitting on a rug.", "Shares dropped a lot this afternoon.",
               "She made spaghetti for supper.", "The spacecraft lifted off to space."]  # fmt: skip
    task = RetrievalTask(
        "toy", docs, Queries(queries, [0, 1, 2, 3]), Queries(queries, [0, 1, 2, 3])
    )
    s = EvalSettings(mode="probe")
    model = packaged_teacher.model
    good = evaluate_encoder(model, packaged_teacher.tokenizer, task, s, [0, 1], "cpu")
    assert good["per_seed"] == [1.0] and good["chosen"][0]["test_recall@1"] == 1.0
    torch.manual_seed(0)
    noise = BertModel(BertConfig(vocab_size=model.config.vocab_size, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))  # fmt: skip
    bad = evaluate_encoder(noise, packaged_teacher.tokenizer, task, s, [0], "cpu")
    assert bad["mean"] < 0.9


def test_linear_probe_separates_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = {k: torch.randint(0, 3, (n,), generator=g) for k, n in [("train", 300), ("validation", 100), ("test", 100)]}  # fmt: skip
    centers = torch.randn(3, 16, generator=g) * 3
    x = {k: centers[v] + torch.randn(len(v), 16, generator=g) for k, v in y.items()}
    assert linear_probe(x, y, 3)["test"] > 0.95
    noise = {k: torch.randn(len(v), 16, generator=g) for k, v in y.items()}
    assert linear_probe(noise, y, 3)["test"] < 0.6  # chance is 1/3


def keyword_task(tokenizer, n=240, seed=0, first: bool = False) -> Task:
    """Label 1 iff the sentence contains 'excellent' (with `first`: iff it STARTS with it, and
    every other sentence has it elsewhere, which a mean-pooled probe of a random encoder cannot
    see): learnable by a tiny encoder."""
    rng = random.Random(seed)
    words = ["the", "a", "film", "plot", "actor", "scene", "long", "short", "music", "story"]

    def make(k):
        texts, labels = [], []
        for _ in range(k):
            s = rng.sample(words, 6)
            y = rng.random() < 0.5
            if first:
                s[0 if y else rng.randrange(1, 6)] = "excellent"
            elif y:
                s[rng.randrange(6)] = "excellent"
            texts.append((" ".join(s), None))
            labels.append(int(y))
        return Split(texts, labels)

    return Task("keyword", ["no", "yes"], make(n), make(60), make(60))


def tiny_encoder(vocab):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    return BertModel(cfg, add_pooling_layer=False)


def test_finetune_learns_a_learnable_task_and_is_seeded(packaged_tokenizer):
    task = keyword_task(packaged_tokenizer, first=True)
    s = EvalSettings(mode="finetune", max_length=16, epochs=4, lr=2e-3, batch_size=16)
    enc = tiny_encoder(packaged_tokenizer.vocab_size)
    a = finetune(enc, packaged_tokenizer, task, s, seed=0, device="cpu")
    b = finetune(enc, packaged_tokenizer, task, s, seed=0, device="cpu")
    assert a == b  # same seed, same numbers
    assert a["test"] > 0.9 and 1 <= a["epoch"] <= 4 and a["lr"] == 2e-3
    # the encoder itself is not modified: fine-tuning works on a copy
    assert torch.equal(enc.embeddings.word_embeddings.weight,
                       tiny_encoder(packaged_tokenizer.vocab_size).embeddings.word_embeddings.weight)  # fmt: skip


def test_finetune_starts_from_the_linear_probe_and_chooses_on_validation(packaged_tokenizer):
    """LP-FT: epoch 0 is the probe itself, so the fine-tuned result is never below the probe on
    validation; with no learning (lr 1e-9) nothing beats it and the probe is what is reported."""
    task = keyword_task(packaged_tokenizer)
    enc = tiny_encoder(packaged_tokenizer.vocab_size)
    s = EvalSettings(mode="probe", max_length=16)
    probe = evaluate_encoder(enc, packaged_tokenizer, task, s, [0], "cpu")
    frozen = finetune(enc, packaged_tokenizer, task, replace(s, mode="finetune", epochs=1, lr=1e-9),
                      seed=0, device="cpu")  # fmt: skip
    assert frozen["epoch"] == 0 and frozen["lr"] is None
    assert frozen["validation"] == pytest.approx(probe["validation"][0])
    assert frozen["test"] == pytest.approx(probe["mean"])
    # a grid: every learning rate is tried, the best (lr, epoch) on validation wins
    grid = finetune(enc, packaged_tokenizer, task, replace(s, mode="finetune", epochs=2, lr=None),
                    seed=0, device="cpu")  # fmt: skip
    assert grid["validation"] >= probe["validation"][0]
    assert grid["lr"] in EvalSettings().learning_rates() or grid["epoch"] == 0


def test_evaluate_encoder_reports_mean_std_per_seed(packaged_tokenizer):
    task = keyword_task(packaged_tokenizer, n=80)
    s = EvalSettings(mode="finetune", max_length=16, epochs=1, lr=2e-3, batch_size=16)
    out = evaluate_encoder(tiny_encoder(packaged_tokenizer.vocab_size), packaged_tokenizer, task, s,
                           [0, 1], "cpu")  # fmt: skip
    assert len(out["per_seed"]) == 2
    assert out["mean"] == pytest.approx(sum(out["per_seed"]) / 2)


# ---------------------------------------------------------------------------- on real runs

SMALL = ["--probe", "--max-train", "60", "--max-eval", "30", "--max-length", "32"]


def test_eval_on_a_run_for_both_offline_tasks(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    res = CliRunner().invoke(
        main, ["eval", str(run), "--task", "wiki_topics", "--task", "rotten_tomatoes", *SMALL]
    )
    assert res.exit_code == 0, res.output
    assert "student" in res.output and "teacher" in res.output
    records = json.loads((run / "evaluations.json").read_text())["evaluations"]
    assert [r["task"] for r in records] == ["wiki_topics", "rotten_tomatoes"]
    for r in records:
        assert 0 <= r["student"]["mean"] <= 1 and 0 <= r["teacher"]["mean"] <= 1
        assert r["splits"]["train"] == 60 and r["mode"] == "probe"


def test_eval_on_a_zoo_entry_records_it_in_the_entry(tiny_run, tmp_path):
    root = tmp_path / "zoo"
    entry = zoo.register(tiny_run.run_dir, root)
    res = CliRunner().invoke(
        main, ["eval", entry, "--zoo", str(root), "--task", "rotten_tomatoes", *SMALL, "--json"]
    )
    assert res.exit_code == 0, res.output
    shown = zoo.show(root, entry)
    evals = json.loads((zoo.entry_dir(root, entry) / "evaluations.json").read_text())["evaluations"]
    assert evals[-1]["task"] == "rotten_tomatoes" and "teacher" in evals[-1]
    assert "rotten_tomatoes" in json.dumps(shown)
    assert zoo.verify(root, entry)["passed"]  # the recorded evaluation keeps it verifiable


def test_teacher_numbers_are_cached_and_identical(tiny_run):
    s = EvalSettings(mode="probe", max_length=32, max_train=40, max_eval=20)
    a = evaluate_dir(tiny_run.run_dir, "wiki_topics", s, [0])
    b = evaluate_dir(tiny_run.run_dir, "wiki_topics", s, [0])
    assert a["teacher"] == b["teacher"] and a["student"]["mean"] == b["student"]["mean"]
