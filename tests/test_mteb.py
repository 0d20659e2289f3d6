"""`compress eval --mteb`: the offline suite through mteb, a user's folders, hub names, records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compressor.cli.main import main
from compressor.errors import DataError
from compressor.evaluate import mteb_data, mteb_tasks
from compressor.teacher import resolve_source
from compressor.zoo import store as zoo
from compressor.zoo.mteb_scores import category_summary, retention
from tests.helpers import PACKAGED

# The packaged teacher's main score on each offline task (measured on this suite's revision,
# mteb-core 2.26.24), with the range a test accepts: wide enough for float and BLAS differences
# between machines, narrow enough that a changed builder, evaluator or pooling shows. Chance
# levels: 0.5 accuracy (2 classes), 0.33 (3 classes), 0.5 AP for balanced pairs.
TEACHER = {
    "MovieSentimentClassification": 0.651,
    "DebatePartyClassification": 0.557,
    "MoviePlotRetrieval": 0.228,
    "WordNetDefinitionRetrieval": 0.576,
    "MovieReviewClustering": 0.273,
    "WordNetTopicClustering": 0.471,
    "WordNetSynonymPairClassification": 0.941,
    "RogetCategoryPairClassification": 0.723,
}
TOLERANCE = 0.02
WORDNET_TASKS = {n for n in mteb_tasks.OFFLINE_SUITE if n.startswith("WordNet")}


def need_wordnet() -> None:
    """WordNet comes from apt (wordnet-base): CI installs it and fails without it; elsewhere the
    WordNet tests skip, saying why."""
    try:
        mteb_data.wordnet_dir()
    except DataError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must install wordnet-base: {err}")
        pytest.skip(str(err))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ANIMALS = ["The cat sleeps on the sofa.", "A dog barks at the mailman.", "Kittens chase yarn."]
FINANCE = ["Stocks fell sharply today.", "The bank raised interest rates.", "Bond yields rose."]


def make_folder(root: Path, layout: str) -> Path:
    """A small folder in one of the field's layouts, with an easy, unambiguous task in it."""
    d = root / layout
    if layout == "retrieval":
        docs = {"d1": "Paris is the capital of France.", "d2": "Photosynthesis makes sugar.",
                "d3": "The Pacific is the largest ocean.", "d4": "Violins have four strings."}  # fmt: skip
        queries = {"q1": "What is the capital of France?", "q2": "How do plants make food?",
                   "q3": "Which ocean is the biggest?", "q4": "How many strings on a violin?"}  # fmt: skip
        write_jsonl(
            d / "corpus.jsonl", [{"_id": k, "title": "", "text": v} for k, v in docs.items()]
        )
        write_jsonl(d / "queries.jsonl", [{"_id": k, "text": v} for k, v in queries.items()])
        (d / "qrels").mkdir()
        lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(1, 5)]
        (d / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    elif layout == "classification":
        rows = [{"text": t, "label": "animals"} for t in ANIMALS] + [
            {"text": t, "label": "finance"} for t in FINANCE
        ]
        write_jsonl(d / "train.jsonl", rows * 3)
        write_jsonl(d / "test.jsonl", rows)
    elif layout == "pairs":
        rows = [
            {"sentence1": "A man is playing guitar.", "sentence2": "Someone plays a guitar.", "label": 1},
            {"sentence1": "A man is playing guitar.", "sentence2": "The stock market crashed.", "label": 0},
            {"sentence1": "Kids swim in the lake.", "sentence2": "Children are swimming.", "label": 1},
            {"sentence1": "Kids swim in the lake.", "sentence2": "Tax forms are due in April.", "label": 0},
        ]  # fmt: skip
        write_jsonl(d / "test.jsonl", rows)
    elif layout == "sts":
        rows = [
            {"sentence1": "A cat sits on a mat.", "sentence2": "A cat is sitting on a mat.", "score": 5.0},
            {"sentence1": "A cat sits on a mat.", "sentence2": "A kitten lies on a rug.", "score": 3.5},
            {"sentence1": "A cat sits on a mat.", "sentence2": "A dog sits outside.", "score": 1.5},
            {"sentence1": "A cat sits on a mat.", "sentence2": "Interest rates rose.", "score": 0.0},
            {"sentence1": "He drives a red car.", "sentence2": "He is driving a red car.", "score": 4.8},
            {"sentence1": "He drives a red car.", "sentence2": "The violin is out of tune.", "score": 0.2},
        ]  # fmt: skip
        write_jsonl(d / "test.jsonl", rows)
    return d


LAYOUTS = {
    "retrieval": "Retrieval",
    "classification": "Classification",
    "pairs": "PairClassification",
    "sts": "STS",
}


# ---------------------------------------------------------------------------- no model needed


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_folder_of_each_layout_is_recognised_and_loads_through_mteb(tmp_path, layout):
    folder = make_folder(tmp_path, layout)
    task, source = mteb_tasks.resolve_task(str(folder))
    assert source == "folder" and task.metadata.type == LAYOUTS[layout]
    assert task.metadata.name == layout
    task.load_data()
    assert task.data_loaded


def test_a_folder_that_fits_no_layout_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad"
    write_jsonl(bad / "test.jsonl", [{"question": "?", "answer": "!"}])
    with pytest.raises(DataError, match=r"fits no task layout.*test\.jsonl's first row"):
        mteb_tasks.resolve_task(str(bad))
    half_beir = tmp_path / "half"
    write_jsonl(half_beir / "corpus.jsonl", [{"_id": "d1", "text": "x"}])
    with pytest.raises(DataError, match=r"needs queries\.jsonl, qrels/test\.tsv"):
        mteb_tasks.resolve_task(str(half_beir))


def test_a_retrieval_folder_with_a_bad_qrels_header_is_a_clear_error(tmp_path):
    folder = make_folder(tmp_path, "retrieval")
    (folder / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    task, _ = mteb_tasks.resolve_task(str(folder))
    with pytest.raises(DataError, match="header query-id, corpus-id, score"):
        task.load_data()


def test_a_hub_task_name_is_stock_mteb_with_its_own_loader():
    import mteb
    from mteb.abstasks.abstask import AbsTask

    task, source = mteb_tasks.resolve_task("STSBenchmark")
    stock = mteb.get_task("STSBenchmark")
    assert source == "hub" and type(task) is type(stock)
    assert type(task).__module__.startswith("mteb.tasks.")
    assert type(task).load_data is AbsTask.load_data  # the hub loader, not one of ours
    assert task.metadata.dataset["path"] == "mteb/stsbenchmark-sts"


def test_a_hub_task_offline_is_a_clear_error_not_a_traceback():
    from compressor.evaluate.mteb_eval import load

    task, source = mteb_tasks.resolve_task("STSBenchmark")
    with pytest.raises(DataError, match="could not load its data from the Hugging Face hub"):
        load(task, "STSBenchmark", source)


def test_an_unknown_name_is_a_clear_error():
    with pytest.raises(DataError, match=r"not an offline task .* not an mteb task name"):
        mteb_tasks.resolve_task("NoSuchTaskAnywhere")


def test_offline_expands_to_the_whole_suite_with_two_tasks_per_category():
    from compressor.zoo.mteb_scores import category

    names = mteb_tasks.expand(["offline", "MoviePlotRetrieval"])
    assert names == list(mteb_tasks.OFFLINE_SUITE)
    kinds = [category(mteb_tasks.offline_task(n).metadata.type) for n in names]
    for kind in ("classification", "retrieval", "clustering", "pair classification"):
        assert kinds.count(kind) >= 2, kinds


def test_offline_data_is_well_formed():
    rt = mteb_data.rotten_tomatoes_rows()
    sentiment = mteb_data.movie_sentiment(rt)
    films = {r["text"].strip(): r["movie_name"] for r in rt}
    assert not {films[t] for t, _ in sentiment.train} & {films[t] for t, _ in sentiment.test}
    assert not {t for t, _ in sentiment.train} & {t for t, _ in sentiment.test}
    plots = mteb_data.movie_plot_retrieval(rt)
    assert all(set(v) <= set(plots.corpus) for v in plots.relevant.values())
    assert set(plots.relevant) == set(plots.queries)
    pairs = mteb_data.roget_pairs(mteb_data.roget_rows())
    assert sum(y for _, _, y in pairs) * 2 == len(pairs)
    assert mteb_data.roget_pairs(mteb_data.roget_rows()) == pairs  # seeded


def test_wordnet_data_is_well_formed():
    need_wordnet()
    synsets = mteb_data.noun_synsets()
    dog = next(s for s in synsets if s.offset == "02084071")
    assert dog.lexname == "noun.animal" and dog.lemmas[:2] == ("dog", "domestic dog")
    assert dog.gloss.startswith("a member of the genus Canis") and '"' not in dog.gloss
    defs = mteb_data.wordnet_definition_retrieval(synsets)
    senses = mteb_data.lemma_senses(synsets)
    assert all(senses[q.lower()] == 1 for q in defs.queries.values())
    synonyms = mteb_data.wordnet_synonym_pairs(synsets)
    assert 0.4 < sum(y for _, _, y in synonyms) / len(synonyms) <= 0.5


def test_retention_and_category_averages_use_the_latest_record_per_task():
    def rec(task, cat, s, t):
        return {"task": task, "mode": "mteb", "category": cat, "student": {"mean": s},
                "teacher": {"mean": t}, "retention": retention(s, t)}  # fmt: skip

    records = [rec("A", "retrieval", 0.1, 0.5), rec("A", "retrieval", 0.4, 0.5),
               rec("B", "retrieval", 0.3, 0.6), rec("C", "clustering", 0.2, 0.2),
               {"task": "wiki_topics", "mode": "probe", "student": {"mean": 0.9}}]  # fmt: skip
    rows = {c["category"]: c for c in category_summary(records)}
    assert set(rows) == {"retrieval", "clustering", "average"}
    assert rows["retrieval"]["tasks"] == 2
    assert rows["retrieval"]["retention"] == pytest.approx((80 + 50) / 2)
    assert rows["average"]["retention"] == pytest.approx((80 + 50 + 100) / 3)
    assert rows["average"]["teacher"] == pytest.approx((0.5 + 0.6 + 0.2) / 3)
    assert retention(0.3, 0.0) is None and retention(0.3, None) is None


# ---------------------------------------------------------------------------- the real teacher


@pytest.fixture(scope="module")
def teacher_encoder():
    from compressor.evaluate.mteb_eval import sentence_encoder

    return sentence_encoder(resolve_source(PACKAGED), "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", mteb_tasks.OFFLINE_SUITE)
def test_each_offline_task_scores_the_teacher_in_its_range(teacher_encoder, name):
    from compressor.evaluate.mteb_eval import load, run_task

    if name in WORDNET_TASKS:
        need_wordnet()
    task, source = mteb_tasks.resolve_task(name)
    load(task, name, source)
    main_score, scores, _ = run_task(teacher_encoder, task)
    assert scores[task.metadata.main_score] == main_score
    assert abs(main_score - TEACHER[name]) <= TOLERANCE, (name, main_score)
    if task.metadata.type == "Clustering":  # sampled: a second encoder sees the same samples
        assert run_task(teacher_encoder, task)[0] == main_score


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_folder_of_each_layout_is_scored_by_mteb(tmp_path, teacher_encoder, layout):
    from compressor.evaluate.mteb_eval import load, run_task

    task, source = mteb_tasks.resolve_task(str(make_folder(tmp_path, layout)))
    load(task, layout, source)
    main_score, scores, _ = run_task(teacher_encoder, task)
    # each folder holds an easy task: the real teacher gets it (nearly) right
    assert main_score >= 0.9, (layout, task.metadata.main_score, main_score, scores)


@pytest.mark.slow
def test_cli_mteb_json_on_a_zoo_entry_records_card_and_show(tiny_run, tmp_path):
    need_wordnet()
    root = tmp_path / "zoo"
    entry = zoo.register(tiny_run.run_dir, root)
    sts = make_folder(tmp_path, "sts")
    args = ["eval", entry, "--zoo", str(root), "--mteb", "WordNetSynonymPairClassification",
            "--mteb", str(sts), "--json"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [t["task"] for t in out["tasks"]] == ["WordNetSynonymPairClassification", "sts"]
    for t in out["tasks"]:
        assert set(t) >= {"task", "type", "main_score", "student", "teacher", "retention", "scores"}
        assert t["retention"] == pytest.approx(100 * t["student"] / t["teacher"])
        assert t["main_score"] in t["scores"]
    assert out["tasks"][0]["type"] == "PairClassification" and out["tasks"][1]["type"] == "STS"
    assert out["tasks"][0]["teacher"] == pytest.approx(TEACHER["WordNetSynonymPairClassification"],
                                                       abs=TOLERANCE)  # fmt: skip
    d = zoo.entry_dir(root, entry)
    card = (d / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    results = front["model-index"][0]["results"]
    mteb_results = [r for r in results if r["dataset"]["name"].startswith("MTEB ")]
    assert {r["task"]["type"] for r in mteb_results} == {"PairClassification", "STS"}
    assert all(r["metrics"][1]["type"] == "teacher_retention" for r in mteb_results)
    assert "## MTEB protocol" in card and "pair classification" in card
    from compressor.zoo.report import show_text

    shown = show_text(zoo.show(root, entry))
    assert "MTEB protocol" in shown and "retention" in shown and "average" in shown
    assert zoo.verify(root, entry)["passed"]


def test_cli_mteb_with_a_bad_folder_exits_non_zero_without_traceback(tiny_run, tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(
        main, ["eval", str(tiny_run.run_dir), "--mteb", str(tmp_path / "empty")]
    )
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "fits no task layout" in res.output
    res = CliRunner().invoke(main, ["eval", str(tiny_run.run_dir)])
    assert res.exit_code == 2 and "give --task or --mteb" in res.output


@pytest.mark.slow
def test_a_comparison_reuses_recorded_scores_and_rescores_a_changed_task(tiny_run, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """`compress baselines` reads each run's MTEB records: a task scored once is not scored
    again, unless its data (its revision) changed."""
    import shutil

    from compressor.evaluate import mteb_eval

    run_dir = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    sts = make_folder(tmp_path, "sts")
    first = mteb_eval.recorded_or_scored(run_dir, [str(sts)])
    assert [r["task"] for r in first] == ["sts"] and "teacher" in first[0]
    real = mteb_eval.evaluate_mteb_dir
    monkeypatch.setattr(mteb_eval, "evaluate_mteb_dir",
                        lambda *a, **k: pytest.fail("scored again"))  # fmt: skip
    assert mteb_eval.recorded_or_scored(run_dir, [str(sts)]) == first
    rows = [json.loads(line) for line in (sts / "test.jsonl").read_text().splitlines()]
    write_jsonl(sts / "test.jsonl", rows[::-1])  # same rows, another order: another revision
    asked = []
    monkeypatch.setattr(mteb_eval, "evaluate_mteb_dir",
                        lambda root, names, **k: asked.append(names) or real(root, names, **k))  # fmt: skip
    again = mteb_eval.recorded_or_scored(run_dir, [str(sts)])
    assert asked == [[str(sts)]]
    assert again[0]["settings"]["revision"] != first[0]["settings"]["revision"]
