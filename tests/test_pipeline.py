"""End to end on the real packaged teacher and real text (tiny recipe), and resume == no resume."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from compressor import pipeline
from compressor.errors import RunDirError
from compressor.metrics import read_metrics
from compressor.recipe import load_recipe
from compressor.shapes import Shape, Vocab, param_count
from tests.helpers import RECIPES, shrink

TINY = RECIPES / "tiny-test.yaml"


@pytest.fixture(scope="module")
def finished(tiny_run):
    return tiny_run


def test_run_writes_the_expected_files(finished):
    d = finished.run_dir
    names = {p.name for p in d.iterdir()}
    assert {"recipe.yaml", "environment.json", "metrics.jsonl", "plan.json", "summary.json",
            "discrepancy.png", "model", "onnx", "verify.json", "benchmark.json", "heldout.json"} <= names  # fmt: skip
    assert finished.summary["export"]["verify"]["model.onnx"]["passed"] is True
    bench = json.loads((d / "benchmark.json").read_text())
    assert {r["runtime"] for r in bench["results"]} == {"onnxruntime"}
    assert "checkpoint.pt" not in names  # superseded by the finished model
    model_files = {p.name for p in (d / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json"} <= model_files
    pooling = json.loads((d / "model" / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 128


def test_slim_model_has_the_target_shape_and_formula_count(finished):
    model = AutoModel.from_pretrained(finished.run_dir / "model")
    assert Shape.of_config(model.config) == Shape(2, 128, 4, 32, 256)
    n = sum(p.numel() for p in model.parameters())
    assert (
        n == param_count(Shape(2, 128, 4, 32, 256), Vocab()) == finished.summary["student_params"]
    )


def test_training_logs_its_throughput(finished):
    """Every training record says how many real tokens a second the loop went through."""
    logged = [r for r in read_metrics(finished.run_dir / "metrics.jsonl") if "loss_total" in r]
    assert len(logged) == load_recipe(TINY).train.steps  # log_every: 1
    trained = [r for r in logged if not r.get("identity_step")]
    assert trained and all(r["tokens_per_s"] > 0 for r in trained)
    assert not any("mfu" in r for r in logged)  # MFU on CUDA devices of known peak only


def test_checks_and_discrepancy_curve(finished):
    s = finished.summary
    assert s["checks"]["step0_identity_max_abs"] <= 1e-5
    assert s["checks"]["masked_vs_slim_max_abs"] <= 1e-4
    records = read_metrics(finished.run_dir / "metrics.jsonl")
    disc = [r for r in records if "discrepancy" in r]
    assert disc[0]["step"] == 0 and disc[0]["discrepancy"] < 1e-6
    assert disc[-1]["step"] == 8
    assert s["discrepancy"]["final"] > 0  # it was pruned to 19% of its size: not free
    widths = [r["hidden"] for r in records if "hidden" in r]
    assert widths == sorted(widths, reverse=True) and widths[-1] == 128


@pytest.mark.slow
def test_resume_gives_the_same_model_as_an_uninterrupted_run(finished, tmp_path):
    stopped = pipeline.run(TINY, output=tmp_path, stop_after=3)
    assert stopped.summary == {"stopped_at": 3}
    assert (stopped.run_dir / "checkpoint.pt").exists()
    resumed = pipeline.resume(stopped.run_dir)
    a = load_file(finished.run_dir / "model" / "model.safetensors")
    b = load_file(resumed.run_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    steps = [
        r["step"] for r in read_metrics(resumed.run_dir / "metrics.jsonl") if "loss_total" in r
    ]
    assert steps == sorted(set(steps))  # no step logged twice after the resume


def test_resume_refuses_a_finished_run(finished):
    with pytest.raises(RunDirError, match="already finished"):
        pipeline.resume(finished.run_dir)


def test_a_run_stopped_after_training_resumes_its_export_and_registration(
    finished, tmp_path, monkeypatch
):
    """Stopped (or killed) in export, verification, benchmark or registration, a run resumes
    there: `compress run --resume` exports, verifies and registers it with the model as trained;
    Ctrl-C in those stages says so."""
    from compressor.errors import Interrupted
    from compressor.rundir import read_summary, write_summary
    from compressor.zoo import store as zoo_store

    run_dir = tmp_path / "run"
    shutil.copytree(finished.run_dir, run_dir)
    for name in ("onnx", "verify.json", "benchmark.json"):
        shutil.rmtree(run_dir / name) if name == "onnx" else (run_dir / name).unlink()
    summary = read_summary(run_dir)
    summary.export = summary.benchmark = None  # as the export stage leaves it when it starts
    write_summary(run_dir, summary)
    weights = (run_dir / "model" / "model.safetensors").read_bytes()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt(2)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "deploy", stop)
        with pytest.raises(Interrupted, match="after training") as err:
            pipeline.resume(run_dir, zoo=tmp_path / "zoo")
    assert err.value.exit_code == 130 and f"compress run --resume {run_dir}" in str(err.value)

    resumed = pipeline.resume(run_dir, zoo=tmp_path / "zoo")
    assert resumed.summary["export"]["verify"]["model.onnx"]["passed"] is True
    assert zoo_store.verify(tmp_path / "zoo", resumed.summary["zoo_id"])["passed"] is True
    assert (run_dir / "model" / "model.safetensors").read_bytes() == weights
    with pytest.raises(RunDirError, match="already finished"):
        pipeline.resume(run_dir)


@pytest.mark.slow
def test_bert_base_shaped_mlm_through_the_full_size_schedule(tmp_path, packaged_tokenizer):
    """A random BERT-base BertForMaskedLM through bert-base-to-6L384.yaml's schedule, compressed
    into 4 steps, slims to 6L/384H/12A/1536I with the formula's parameter count."""
    from transformers import BertConfig, BertForMaskedLM

    from compressor.teacher import Teacher, freeze

    recipe = shrink(
        RECIPES / "bert-base-to-6L384.yaml",
        data=dict(source="wiki_summaries", streaming=False, name=None, max_length=24, heldout=3,
                  quality_texts=8),
        pruning=dict(start_step=0, end_step=3, interval=1),
        train=dict(steps=4, batch_size=2, grad_accum=1, device="cpu", precision="fp32",
                   warmup_steps=1, eval_every=2, log_every=1),
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = BertConfig(architectures=["BertForMaskedLM"])  # defaults = BERT-base
    teacher = freeze(Teacher(BertForMaskedLM(cfg), packaged_tokenizer, None, "random-bert-base"))
    assert teacher.shape == Shape(12, 768, 12, 64, 3072)
    res = pipeline.run(recipe, output=tmp_path, teacher=teacher)
    want = Shape(6, 384, 12, 32, 1536)
    assert Shape(**res.summary["student_shape"]) == want
    assert res.summary["student_params"] == param_count(want, Vocab(), pooler=False, mlm_head=True)
    assert res.summary["checks"]["masked_vs_slim_max_abs"] <= 1e-4
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert len(plan["layers"]) == 6 and all(len(h) == 12 for h in plan["heads"])
