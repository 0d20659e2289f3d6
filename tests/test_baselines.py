"""The baselines of the comparison, expressed in the recipe grammar: one-shot pruning, DistilBERT-style
initialisation (evenly spaced layers, first-k widths) and random initialisation, at the same shape
and budget as HomoDistil."""

import json

import pytest
import torch
from safetensors.torch import load_file

from compressor import pipeline
from compressor.baselines.variants import (
    VARIANTS,
    aggregate,
    markdown_table,
    variant_recipe,
)
from compressor.data import Corpus
from compressor.errors import RecipeError
from compressor.evaluate.settings import EvalSettings
from compressor.metrics import read_metrics
from compressor.prune.importance import truncation_scores
from compressor.prune.masks import Masks, prune_to
from compressor.recipe import load_recipe, parse_recipe, recipe_to_dict, with_overrides
from compressor.shapes import Shape
from tests.helpers import RECIPES, small_recipe, small_teacher

FULL = Shape(6, 64, 4, 16, 128)


def run_variant(variant, tokenizer, tmp_path, steps=1, lr=1e-7):
    recipe = variant_recipe(small_recipe(steps, lr), variant, seed=0)
    teacher = small_teacher(tokenizer)
    res = pipeline.run(recipe, output=tmp_path, teacher=teacher)
    return teacher, res


def test_variants_differ_only_in_what_they_name():
    base = load_recipe(RECIPES / "compare-minilm-4L256.yaml")
    recipes = {v: variant_recipe(base, v, seed=2) for v in VARIANTS}
    for r in recipes.values():
        assert (r.target, r.train.steps, r.train.batch_size, r.data) == (
            base.target, base.train.steps, base.train.batch_size, base.data
        )  # fmt: skip
        assert r.train.seed == 2 and not r.export.onnx
    for v in ("homodistil", "one_shot", "distilbert", "random"):  # trained by the pipeline
        assert recipes[v].distill == base.distill
    # the slice is not trained and st_distill trains with its own loss: the recipe's losses and
    # schedule are not theirs, so changing them leaves these runs reusable
    changed = with_overrides(base, ["distill.hidden=0.5", "pruning.end_step=60"])
    for v in ("slice", "st_distill"):
        assert variant_recipe(changed, v, seed=2) == recipes[v]
        assert recipes[v].pruning.structures == base.pruning.structures
    assert recipes["homodistil"].pruning == base.pruning
    assert recipes["one_shot"].pruning.schedule == "one_shot"
    assert recipes["one_shot"].pruning.importance == "sensitivity"
    d = recipes["distilbert"].pruning
    assert (d.schedule, d.importance, d.layer_selection) == ("one_shot", "truncate", "uniform")
    assert recipes["random"].student.init == "random"
    assert recipes["homodistil"].student.init == "teacher"
    with pytest.raises(RecipeError, match="unknown variant"):
        variant_recipe(base, "magic", 0)


def test_truncation_requires_uniform_layers():
    raw = recipe_to_dict(small_recipe())
    raw["pruning"].update(importance="truncate", layer_selection="sensitivity")
    with pytest.raises(RecipeError, match="layer_selection"):
        parse_recipe(raw)


def test_truncation_scores_keep_the_first_k():
    m = prune_to(Masks.full(FULL), truncation_scores(FULL), Shape(6, 32, 2, 8, 64))
    assert m.hidden.nonzero().flatten().tolist() == list(range(32))
    assert all(m.heads[i].nonzero().flatten().tolist() == [0, 1] for i in range(6))
    assert bool(m.qk[:, :, :8].all()) and not bool(m.qk[:, :, 8:].any())
    assert bool(m.ffn[:, :64].all()) and not bool(m.ffn[:, 64:].any())


def test_distilbert_init_keeps_evenly_spaced_layers_and_the_first_dims(
    tmp_path, packaged_tokenizer
):
    teacher, res = run_variant("distilbert", packaged_tokenizer, tmp_path)
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["layers"] == [1, 3, 5]  # (i + 1) * 6 // 3 - 1
    assert plan["hidden"] == list(range(32))
    assert plan["heads"] == [[0, 1]] * 3
    assert plan["ffn"] == [list(range(64))] * 3
    assert all(dims == list(range(16)) for layer in plan["qk_dims"] for dims in layer)
    # one step at lr 1e-7 from an exact copy: the slim weights are the teacher's, sliced
    t = teacher.model.state_dict()
    s = load_file(res.run_dir / "model" / "model.safetensors")
    emb = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(s[emb], t[emb][:, :32], atol=1e-5, rtol=0)
    for new, old in enumerate(plan["layers"]):
        w = "encoder.layer.{}.intermediate.dense.weight"
        torch.testing.assert_close(s[w.format(new)], t[w.format(old)][:64, :32], atol=1e-5, rtol=0)
        q = "encoder.layer.{}.attention.self.query.weight"
        torch.testing.assert_close(s[q.format(new)], t[q.format(old)][:32, :32], atol=1e-5, rtol=0)


def test_random_init_has_the_target_shape_and_none_of_the_teacher(tmp_path, packaged_tokenizer):
    teacher, res = run_variant("random", packaged_tokenizer, tmp_path)
    assert Shape(**res.summary["student_shape"]) == Shape(3, 32, 2, 16, 64)
    assert res.summary["checks"]["step0_identity_max_abs"] <= 1e-5  # masked == stock forward
    s = load_file(res.run_dir / "model" / "model.safetensors")
    t = teacher.model.state_dict()
    emb = "embeddings.word_embeddings.weight"
    assert (s[emb] - t[emb][:, :32]).abs().max() > 0.05
    # BERT's own initialiser: N(0, 0.02) weights and unit LayerNorms (one step at lr 1e-7 later)
    assert abs(float(s["encoder.layer.0.intermediate.dense.weight"].std()) - 0.02) < 0.005
    torch.testing.assert_close(
        s["encoder.layer.0.output.LayerNorm.weight"], torch.ones(32), atol=1e-5, rtol=0
    )


def test_one_shot_is_at_the_target_width_after_step_0(tmp_path, packaged_tokenizer):
    _, res = run_variant("one_shot", packaged_tokenizer, tmp_path, steps=3, lr=1e-4)
    widths = [(r["step"], r["hidden"], r["ffn"]) for r in read_metrics(res.run_dir / "metrics.jsonl")
              if "loss_total" in r]  # fmt: skip
    assert widths == [(1, 32, 64), (2, 32, 64), (3, 32, 64)]


def test_aggregate_and_table():
    rows = [
        {"variant": v, "seed": s, "params": 100, "discrepancy_final": d, "teacher_params": 400,
         "score": {"t": a}, "metric": {"t": "ndcg@10"}, "teacher_score": {"t": 0.9},
         "quality": {"similarity_spearman": q}, "curve": [(0, 0.0)]}
        for v, s, d, a, q in [("homodistil", 0, 0.1, 0.8, 0.9), ("homodistil", 1, 0.3, 0.6, 0.7),
                              ("random", 0, 0.9, 0.5, 0.2)]
    ]  # fmt: skip
    base = load_recipe(RECIPES / "compare-minilm-4L256.yaml")
    res = aggregate(rows, base, EvalSettings(mode="probe"), ["t"])
    h = res["variants"]["homodistil"]
    assert h["discrepancy_final"]["mean"] == pytest.approx(0.2)
    assert h["score"]["t"]["mean"] == pytest.approx(0.7)
    assert h["score"]["t"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert h["similarity_spearman"]["mean"] == pytest.approx(0.8)
    assert res["variants"]["random"]["score"]["t"]["std"] == 0.0
    table = markdown_table(res)
    assert (
        "| variant | params | similarity to teacher (Spearman) | held-out discrepancy | t ndcg@10 |"
        in table
    )
    assert "| homodistil | 0.0M | 0.8000 ± 0.1414 | 0.2000 ± 0.1414 | 0.7000 ± 0.1414 |" in table
    assert "| teacher | 0.0M | 1 | 0 | 0.9000 |" in table


def mteb_row(variant, seed, scores):
    """A comparison row with MTEB cells: two tasks of one category, one of another."""
    kinds = {"A": ("retrieval", "ndcg_at_10"), "B": ("retrieval", "ndcg_at_10"),
             "C": ("clustering", "v_measure")}  # fmt: skip
    teacher = {"A": 0.5, "B": 0.7, "C": 0.4}
    return {"variant": variant, "seed": seed, "params": 100, "discrepancy_final": 0.1,
            "teacher_params": 400, "score": {}, "metric": {}, "teacher_score": {},
            "quality": {"similarity_spearman": 0.9}, "curve": [(0, 0.0)],
            "mteb": {t: {"category": kinds[t][0], "metric": kinds[t][1], "student": scores[t],
                         "teacher": teacher[t]} for t in kinds}}  # fmt: skip


def test_mteb_comparison_averages_categories_and_pairs_by_seed():
    ours = [mteb_row("homodistil", s, {"A": 0.4 + d, "B": 0.6, "C": 0.3 + d})
            for s, d in [(0, 0.0), (1, 0.02), (2, 0.04)]]  # fmt: skip
    # st_distill: listed in another seed order, ahead on clustering at every seed, level on
    # retrieval on average but not at every seed
    theirs = [mteb_row("st_distill", s, {"A": 0.4 + d, "B": 0.6, "C": 0.35 + d})
              for s, d in [(2, 0.01), (0, 0.03), (1, 0.02)]]  # fmt: skip
    res = aggregate(ours + theirs, load_recipe(RECIPES / "compare-minilm-4L256.yaml"),
                    EvalSettings(mode="probe"), [])  # fmt: skip
    m = res["mteb"]
    assert m["teacher"]["categories"] == pytest.approx(
        {"clustering": 0.4, "retrieval": 0.6, "average": (0.5 + 0.7 + 0.4) / 3}
    )
    h = m["variants"]["homodistil"]
    assert h["categories"]["retrieval"]["per_seed"] == pytest.approx([0.5, 0.51, 0.52])
    assert h["categories"]["clustering"]["mean"] == pytest.approx(0.32)
    # retention: the mean over tasks of student / teacher, per seed, then over seeds
    assert h["retention"]["average"]["per_seed"][0] == pytest.approx(
        100 * (0.4 / 0.5 + 0.6 / 0.7 + 0.3 / 0.4) / 3
    )
    v = m["versus"]["st_distill"]
    # paired by seed, not by position: seed 0 is 0.0 - 0.03, seed 1 0.02 - 0.02, seed 2 0.04 - 0.01
    assert v["retrieval"]["per_seed"] == pytest.approx([-0.015, 0.0, 0.015])
    assert v["retrieval"]["verdict"] == "inside the noise"
    assert v["clustering"]["verdict"] == "behind"
    assert v["clustering"]["high"] < 0
    table = markdown_table(res)
    assert "| HomoDistil vs | clustering | retrieval | average |" in table
    assert "| st_distill | -0.0500 [-0.0800, -0.0200] behind |" in table


def test_paired_difference_interval_and_verdict():
    from compressor.stats import paired_difference

    d = paired_difference([0.5, 0.6, 0.7], [0.4, 0.45, 0.69])
    assert d["mean"] == pytest.approx((0.1 + 0.15 + 0.01) / 3)
    # 3 pairs: the interval is the range of the differences (an all-equal resample has p = 1/27)
    assert (d["low"], d["high"]) == pytest.approx((0.01, 0.15))
    assert d["verdict"] == "ahead"
    many = paired_difference([float(i % 7) for i in range(40)], [3.0] * 40)
    assert many["low"] < many["mean"] < many["high"] and many["verdict"] == "inside the noise"
    assert paired_difference([0.0, 0.0], [0.1, 0.2])["verdict"] == "behind"
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_untrained_slice_is_the_teacher_sliced_with_no_training(tmp_path, packaged_tokenizer):
    """The `slice` baseline: evenly spaced layers and the first k of every width, weights exactly
    the teacher's, a finished run directory with its quality, compared like any trained run."""
    recipe = variant_recipe(small_recipe(), "slice", seed=0)
    teacher = small_teacher(packaged_tokenizer)
    res = pipeline.untrained_slice(recipe, tmp_path, teacher=teacher)
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["layers"] == [1, 3, 5] and plan["hidden"] == list(range(32))
    s = load_file(res.run_dir / "model" / "model.safetensors")
    t = teacher.model.state_dict()
    emb = "embeddings.word_embeddings.weight"
    assert torch.equal(s[emb], t[emb][:, :32])  # not one step of training
    w = "encoder.layer.{}.output.dense.weight"
    assert torch.equal(s[w.format(2)], t[w.format(5)][:32, :64])
    assert res.summary["steps"] == 0 and res.summary["checks"]["masked_vs_slim_max_abs"] < 1e-5
    assert 0 < res.summary["quality"]["similarity_spearman"] < 1
    [record] = read_metrics(res.run_dir / "metrics.jsonl")
    assert record["step"] == 0 and record["discrepancy"] == res.summary["discrepancy"]["final"]


def test_overrides_apply_to_the_base_and_are_validated():
    base = load_recipe(RECIPES / "compare-minilm-4L256.yaml")
    r = with_overrides(base, ["pruning.end_step=50", "train.lr=1e-4"])
    assert r.pruning.end_step == 50 and r.train.lr == 1e-4 and r.target == base.target
    with pytest.raises(RecipeError, match=r"end_step: unknown key"):  # a top-level key, unknown
        with_overrides(base, ["end_step=50"])
    with pytest.raises(RecipeError, match=r"pruning\.end_step"):
        with_overrides(base, ["pruning.end_step=500"])  # past train.steps


def test_a_recorded_evaluation_is_reused_unless_a_setting_it_used_changed(tmp_path):
    """Probe and retrieval results do not depend on fine-tuning's epochs or lr: changing those
    must not re-run them; changing what they do use must. One without the teacher's numbers is
    not reused (the comparison and the quality gate need both)."""
    from compressor.evaluate.evaluation import evaluation_of
    from compressor.rundir import evals_path

    probe = EvalSettings(mode="probe", lr=1e-4)
    finetune = EvalSettings(mode="finetune", lr=1e-4)
    records = [
        {"task": "sst", "splits": {"train": 10}, "settings": probe.to_dict(), "teacher": {}},
        {"task": "sst", "splits": {"train": 10}, "settings": finetune.to_dict(), "teacher": {}},
        {
            "task": "films",
            "splits": {"documents": 5},
            "settings": finetune.to_dict(),
            "teacher": {},
        },
        {"task": "alone", "splits": {"train": 10}, "settings": probe.to_dict()},
    ]
    evals_path(tmp_path).write_text(json.dumps({"evaluations": records}))
    assert (
        evaluation_of(tmp_path, "sst", EvalSettings(mode="probe", lr=None, epochs=9)) == records[0]
    )
    assert evaluation_of(tmp_path, "sst", EvalSettings(mode="probe", max_train=50)) is None
    assert evaluation_of(tmp_path, "sst", EvalSettings(mode="finetune", lr=1e-4)) == records[1]
    assert evaluation_of(tmp_path, "sst", EvalSettings(mode="finetune", lr=3e-4)) is None
    assert evaluation_of(tmp_path, "films", EvalSettings(mode="probe", max_train=7)) == records[2]
    assert evaluation_of(tmp_path, "films", EvalSettings(max_eval=7)) is None
    assert evaluation_of(tmp_path, "alone", probe) is None


def test_a_finished_run_is_reused_only_if_made_with_the_same_recipe(tmp_path):
    """Re-running a comparison resumes from its finished runs, whatever thread count it was made
    with; a run made with another recipe (another lr, a stale output directory) is refused by
    name, never silently counted."""
    import yaml

    from compressor.baselines.variants import run_variant
    from compressor.errors import RunDirError

    recipe = variant_recipe(small_recipe(), "homodistil", seed=0)
    run_dir = tmp_path / recipe.name / "20260101-000000"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe)))
    (run_dir / "summary.json").write_text("{}")
    assert run_variant("homodistil", recipe, tmp_path) == run_dir
    # the thread count changes the speed, not the result: the run is the same run
    assert (
        run_variant("homodistil", with_overrides(recipe, ["train.threads=3"]), tmp_path) == run_dir
    )
    other = with_overrides(recipe, ["train.lr=1e-4"])
    with pytest.raises(RunDirError, match=r"another recipe \(train\.lr: 1e-07 -> 0\.0001\)"):
        run_variant("homodistil", other, tmp_path)


def test_jobs_train_in_parallel_processes_what_one_process_trains(tmp_path):
    """`--jobs 2`: the runs of a comparison trained two at a time in worker processes end with
    the same weights as when trained one by one; unset threads are refused, and a worker's typed
    error reaches the parent with its message and exit code."""
    from compressor.baselines.variants import run_variant, train_all
    from compressor.errors import CompressError

    base = with_overrides(load_recipe(RECIPES / "tiny-test.yaml"), ["train.threads=1"])
    plan = [(v, 0, variant_recipe(base, v, 0)) for v in ("homodistil", "one_shot")]
    train_all(plan, tmp_path / "parallel", jobs=2)
    for variant, _, recipe in plan:
        a = load_file(
            run_variant(variant, recipe, tmp_path / "parallel") / "model" / "model.safetensors"
        )
        b = load_file(
            run_variant(variant, recipe, tmp_path / "serial") / "model" / "model.safetensors"
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    unset = with_overrides(base, ["train.threads=null"])
    with pytest.raises(RecipeError, match="give each its threads"):
        train_all([("homodistil", 0, variant_recipe(unset, "homodistil", 0))], tmp_path, jobs=2)
    stale = with_overrides(plan[0][2], ["train.lr=1e-5"])  # its run dir holds another lr's run
    with pytest.raises(CompressError, match="another recipe") as err:
        train_all([("homodistil", 0, stale)], tmp_path / "parallel", jobs=2)
    assert err.value.exit_code == 2


def st_recipe(steps: int = 10, lr: float = 1e-3):
    """The tiny base recipe as the st_distill variant: one text per sequence, 4 a step, enough
    training texts (steps x 4 >= 32) for the PCA down-projection to the student's 32 dims."""
    raw = recipe_to_dict(variant_recipe(small_recipe(steps, lr), "st_distill", seed=0))
    raw["train"].update(batch_size=4, eval_every=5)
    raw["data"].update(pack=False, heldout=8)
    return parse_recipe(raw)


def test_st_distill_trains_with_sentence_transformers_mse_loss(
    tmp_path, packaged_tokenizer, monkeypatch
):
    """The users' baseline is the sentence-transformers recipe run by sentence-transformers: its
    MSELoss computes every training step's loss (a spy subclass counts the calls; swap the loss
    and it is never called), the loss falls, the student's embeddings move toward the teacher's
    (PCA-projected) ones, on HomoDistil's texts, and a second run with the same seed ends with
    the same weights."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses
    from transformers import AutoModel

    from compressor.baselines.st_distill import st_distill

    calls, seen = [], []

    class Spy(losses.MSELoss):
        def forward(self, sentence_features, labels):
            value = super().forward(sentence_features, labels)
            calls.append(float(value.detach()))
            seen.append(sentence_features[0]["input_ids"] * sentence_features[0]["attention_mask"])
            return value

    recipe = st_recipe()
    with monkeypatch.context() as m:
        m.setattr(losses, "MSELoss", Spy)
        spied = st_distill(recipe, tmp_path / "a", teacher=small_teacher(packaged_tokenizer))
    assert len(calls) == recipe.train.steps  # one micro-batch a step, every one through MSELoss
    assert sum(calls[-3:]) < 0.7 * sum(calls[:3])
    # step s trained on HomoDistil's step-s sequences, token for token
    homodistil = Corpus(recipe.data, packaged_tokenizer, 0, 4, 1).batches(0)
    for step_ids in seen:
        want = next(homodistil)[0].input_ids
        assert (
            torch.equal(step_ids[:, : want.shape[1]], want)
            and not step_ids[:, want.shape[1] :].any()
        )
    res = st_distill(recipe, tmp_path / "b", teacher=small_teacher(packaged_tokenizer))
    record = json.loads((res.run_dir / "st_distill.json").read_text())
    assert record["loss"] == "sentence_transformers.sentence_transformer.losses.mse.MSELoss"
    assert record["trainer"].endswith(".SentenceTransformerTrainer")
    assert record["teacher_projection"] == "pca" and record["texts"] == 10 * 4
    mse = record["embedding_mse"]
    assert mse["after"] < 0.6 * mse["before"]
    logged = [r["loss_mse"] for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss_mse" in r]
    assert logged[-1] < logged[0]

    # the same texts and tokens as HomoDistil's steps, and the slice's layers and widths
    assert res.summary["checks"]["retokenized_mismatches"] == 0
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["layers"] == [1, 3, 5] and plan["hidden"] == list(range(32))
    assert Shape(**res.summary["student_shape"]) == Shape(3, 32, 2, 16, 64)
    assert res.summary["steps"] == 10 and 0 < res.summary["quality"]["similarity_spearman"] < 1
    steps = [r["step"] for r in read_metrics(res.run_dir / "metrics.jsonl") if "discrepancy" in r]
    assert steps == [0, 5, 10]
    # deterministic under the seed; a stock transformers model with sentence-transformers files
    a = load_file(spied.run_dir / "model" / "model.safetensors")
    b = load_file(res.run_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert AutoModel.from_pretrained(res.run_dir / "model").config.hidden_size == 32
    st = SentenceTransformer(str(res.run_dir / "model"), device="cpu")
    assert st.get_embedding_dimension() == 32
    assert res.summary["checks"]["st_reload_max_abs"] < 1e-5


def test_st_distill_is_a_variant_trained_by_sentence_transformers(tmp_path, monkeypatch):
    """`compress baselines --baselines st_distill`: the variant is the slice's recipe (same
    target, data, steps, batch, seed) and its run is made by st_distill, not the pipeline."""
    from compressor.baselines import variants as baselines

    base = load_recipe(RECIPES / "compare-minilm-4L256.yaml")
    r = variant_recipe(base, "st_distill", seed=1)
    assert (r.target, r.data, r.train.steps, r.train.batch_size, r.train.seed) == (
        base.target, base.data, base.train.steps, base.train.batch_size, 1
    )  # fmt: skip
    assert (r.pruning.importance, r.pruning.layer_selection) == ("truncate", "uniform")
    made = []
    monkeypatch.setattr(baselines, "st_distill",
                        lambda recipe, root: made.append(recipe) or pipeline.RunResult(root, {}))  # fmt: skip
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("trained by the pipeline"))
    assert baselines.run_variant("st_distill", r, tmp_path) == tmp_path
    assert made == [r]


def test_st_distill_refuses_too_few_texts_for_its_projection(tmp_path, packaged_tokenizer):
    from compressor.baselines.st_distill import st_distill

    with pytest.raises(RecipeError, match="needs at least 32 training texts"):
        st_distill(st_recipe(steps=2), tmp_path, teacher=small_teacher(packaged_tokenizer))
    assert not list(tmp_path.rglob("summary.json")) and not list(tmp_path.glob("*/*"))


def test_cli_baselines_needs_something_to_score_on(tmp_path):
    from click.testing import CliRunner

    from compressor.cli.main import main

    args = ["baselines", str(RECIPES / "compare-minilm-4L256.yaml"), "--mteb", "", "--out",
            str(tmp_path / "out")]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "give --mteb or --tasks" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_one_seed_has_no_spread_and_no_interval():
    """Over one seed a comparison prints the means and the difference alone: no `± 0.0000`
    spread and no degenerate interval claiming a verdict."""
    from compressor.baselines.variants import spread, versus_cell
    from compressor.stats import paired_difference

    one = paired_difference([0.5], [0.4])
    assert one["mean"] == pytest.approx(0.1) and one["low"] is None and one["high"] is None
    assert one["verdict"] == "one seed: no interval"
    assert versus_cell(one) == "+0.1000 (one seed: no interval)"
    assert spread(0.5, 0.0, 1) == "0.5000" and spread(77.7, 0.0, 1, 1, "%") == "77.7%"
    assert spread(0.5, 0.01, 3) == "0.5000 ± 0.0100"
    two = paired_difference([0.5, 0.6], [0.4, 0.45])
    assert versus_cell(two).startswith("+0.1250 [+0.1000, +0.1500] ahead")
