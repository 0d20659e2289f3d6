"""The sentence-transformers graph of a sentence encoder: pooling (and normalisation) in the ONNX
graph, checked against sentence-transformers' own modules, loadable offline by
SentenceTransformer(dir) and SentenceTransformer(dir, backend="onnx")."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor.deploy.export import export_onnx, save_samples
from compressor.deploy.runtime import ort_session
from compressor.deploy.sentence import (
    GRAPH_REFERENCES,
    SentenceSpec,
    sentence_spec,
    write_sentence_graph,
)
from compressor.deploy.verify import Tolerance, verify_export, write_and_gate
from compressor.errors import CheckFailed
from compressor.prune.slim import save_slim_model
from compressor.rundir import ONNX_FILE, SENTENCE_ONNX, SENTENCE_ONNX_FILE
from compressor.teacher import resolve_source, sentence_transformers_files
from tests.helpers import EXPORT_TEXTS, EXPORT_TOL, PACKAGED, ROOT, tiny_bert

SENTENCE_OUTPUTS = ["last_hidden_state", "token_embeddings", "sentence_embedding"]


def st_files(pooling: str = "mean", normalize: bool = True) -> dict:
    """The packaged teacher's sentence-transformers files, with the pooling and the Normalize
    module chosen."""
    files = sentence_transformers_files(Path(resolve_source(PACKAGED)))
    modules = files["modules.json"]
    files["modules.json"] = modules if normalize else modules[:2]
    pool = files["1_Pooling/config.json"]
    for key in [k for k in pool if k.startswith("pooling_mode")]:
        pool[key] = False
    pool[{"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
          "max": "pooling_mode_max_tokens"}[pooling]] = True  # fmt: skip
    files["sentence_bert_config.json"] = {"max_seq_length": 64, "do_lower_case": False}
    return files


def st_export(tmp_path, tokenizer, pooling="mean", normalize=True):
    """A tiny sentence encoder (seeded BERT + sentence-transformers files), exported."""
    model = tiny_bert(vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    model_dir, onnx_dir = tmp_path / "model", tmp_path / "onnx"
    save_slim_model(model, tokenizer, st_files(pooling, normalize), model_dir)
    report = export_onnx(model_dir, onnx_dir)
    save_samples(onnx_dir, model_dir, EXPORT_TEXTS, (1, 3), (8, 32))
    return model_dir, onnx_dir, report


def verify_sentence(model_dir: Path, onnx_dir: Path, tol: Tolerance = EXPORT_TOL):
    return verify_export(model_dir, SENTENCE_ONNX_FILE, tol, GRAPH_REFERENCES, onnx_dir)


def within(got: np.ndarray, want: np.ndarray, tol: Tolerance = EXPORT_TOL) -> bool:
    return bool(np.all(np.abs(got - want) <= tol.atol + tol.rtol * np.abs(want)))


@pytest.mark.parametrize(
    ("pooling", "normalize"), [("mean", True), ("mean", False), ("cls", True), ("max", False)]
)
def test_sentence_graph_matches_sentence_transformers(
    tmp_path, packaged_tokenizer, pooling, normalize
):
    model_dir, onnx_dir, report = st_export(tmp_path, packaged_tokenizer, pooling, normalize)
    assert report["sentence_graph"] == {
        "file": "onnx/model.onnx",
        "pooling": pooling,
        "normalize": normalize,
    }
    r = verify_sentence(model_dir, onnx_dir)
    assert r.passed, r.failures
    assert {c["output"] for c in r.checks if "output" in c} == set(SENTENCE_OUTPUTS)
    assert next(c for c in r.checks if "min" in c)["sentence_embedding_cosine"] > 0.9999
    sess = ort_session(model_dir / SENTENCE_ONNX_FILE)
    assert [o.name for o in sess.get_outputs()] == SENTENCE_OUTPUTS
    # the token graph is checked as before: the sentence reference is not asked of it
    token = verify_export(onnx_dir, ONNX_FILE, EXPORT_TOL)
    assert token.passed, token.failures
    assert {c["output"] for c in token.checks if "output" in c} == {"last_hidden_state"}


def test_both_backends_load_offline_and_encode_like_the_pytorch_student(
    tmp_path, packaged_tokenizer, caplog
):
    from sentence_transformers import SentenceTransformer

    model_dir, _, _ = st_export(tmp_path, packaged_tokenizer)
    with caplog.at_level(logging.WARNING):
        on_onnx = SentenceTransformer(str(model_dir), backend="onnx", local_files_only=True)
        on_torch = SentenceTransformer(str(model_dir), local_files_only=True)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert (
        Path(on_onnx[0].auto_model.path) == model_dir / SENTENCE_ONNX_FILE
    )  # ours, not re-exported
    want = on_torch.encode(EXPORT_TEXTS)
    got = on_onnx.encode(EXPORT_TEXTS)
    assert want.shape == (len(EXPORT_TEXTS), 32)
    assert within(got, want), np.abs(got - want).max()
    # onnxruntime alone: the graph's own sentence_embedding
    enc = packaged_tokenizer(EXPORT_TEXTS, padding=True, return_tensors="np")
    sess = ort_session(model_dir / SENTENCE_ONNX_FILE)
    alone = sess.run(["sentence_embedding"], {k: v.astype(np.int64) for k, v in enc.items()})[0]
    assert within(alone, want), np.abs(alone - want).max()
    assert np.allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)  # Normalize is in the graph


def test_verification_fails_when_the_pooling_is_wrong(tmp_path, packaged_tokenizer):
    """CLS pooling written in place of the teacher's mean pooling: the sentence embedding is
    named as the failing output (the token outputs still agree), and the gate raises."""
    model_dir, onnx_dir, _ = st_export(tmp_path, packaged_tokenizer)  # mean + Normalize
    graph = model_dir / SENTENCE_ONNX_FILE
    write_sentence_graph(onnx_dir / ONNX_FILE, graph, SentenceSpec("cls", normalize=True))
    r = verify_sentence(model_dir, onnx_dir)
    assert not r.passed
    assert all("sentence_embedding" in f for f in r.failures), r.failures
    assert any("output 'sentence_embedding'" in f and "differs by up to" in f for f in r.failures)
    with pytest.raises(CheckFailed, match="sentence_embedding"):
        write_and_gate([r], tmp_path / "verify.json")
    assert json.loads((tmp_path / "verify.json").read_text())["passed"] is False
    # normalisation forgotten: also caught
    write_sentence_graph(onnx_dir / ONNX_FILE, graph, SentenceSpec("mean", normalize=False))
    assert not verify_sentence(model_dir, onnx_dir).passed


def test_modules_the_graph_cannot_express_are_named_and_skipped(tmp_path, packaged_tokenizer):
    model = tiny_bert(vocab_size=packaged_tokenizer.vocab_size, max_position_embeddings=64)
    files = st_files()
    files["modules.json"] = [
        *files["modules.json"][:2],
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    model_dir = tmp_path / "model"
    save_slim_model(model, packaged_tokenizer, files, model_dir)
    with pytest.raises(CheckFailed, match=r"modules \['Transformer', 'Pooling', 'Dense'\]"):
        sentence_spec(model_dir)
    report = export_onnx(model_dir, tmp_path / "onnx")
    assert "Dense" in report["sentence_graph"]["skipped"]
    assert not (model_dir / SENTENCE_ONNX_FILE).exists()
    pool = files["1_Pooling/config.json"]
    pool.update(pooling_mode_mean_tokens=False, pooling_mode_lasttoken=True)
    files["modules.json"] = files["modules.json"][:2]
    save_slim_model(model, packaged_tokenizer, files, model_dir)
    with pytest.raises(CheckFailed, match=r"pooling \['lasttoken'\]"):
        sentence_spec(model_dir)


def test_the_run_writes_a_verified_sentence_transformers_model(tiny_run):
    """The real packaged teacher's student: model/ is a sentence-transformers model whose ONNX
    graph is verified with the others and encodes like its PyTorch modules."""
    from sentence_transformers import SentenceTransformer

    d = tiny_run.run_dir
    verify = json.loads((d / "verify.json").read_text())
    report = next(r for r in verify["reports"] if r["model"] == SENTENCE_ONNX)
    assert verify["passed"] and report["passed"]
    assert tiny_run.summary["export"]["sentence_graph"] == {
        "file": "onnx/model.onnx",
        "pooling": "mean",
        "normalize": True,
    }
    assert tiny_run.summary["export"]["verify"][SENTENCE_ONNX]["passed"] is True
    texts = json.loads((d / "heldout.json").read_text())[:4]
    on_onnx = SentenceTransformer(str(d / "model"), backend="onnx", local_files_only=True)
    on_torch = SentenceTransformer(str(d / "model"), local_files_only=True)
    got, want = on_onnx.encode(texts), on_torch.encode(texts)
    assert want.shape == (4, 128) and within(got, want), np.abs(got - want).max()


def test_a_broken_sentence_graph_fails_the_run_check(tiny_run, tmp_path):
    from compressor.deploy.stages import verify_again

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run.run_dir, run_dir)
    write_sentence_graph(
        run_dir / "onnx" / ONNX_FILE, run_dir / SENTENCE_ONNX, SentenceSpec("cls", True)
    )
    with pytest.raises(
        CheckFailed, match=r"model/onnx/model.onnx \[.*\]: output 'sentence_embedding'"
    ):
        verify_again(run_dir)
    assert json.loads((run_dir / "verify.json").read_text())["passed"] is False


def test_a_normal_export_prints_no_warnings(tiny_run, tmp_path):
    """`compress export --onnx` in a fresh process (the way a user runs it): nothing on stderr but
    what we print (no accelerate hint, no deprecation or tracer warnings)."""
    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run.run_dir, run_dir)
    res = subprocess.run(
        [sys.executable, "-m", "compressor", "export", "--onnx", "--no-bench", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    noise = [
        line
        for line in (res.stdout + res.stderr).splitlines()
        if any(w in line.lower() for w in ("warn", "deprecat", "requires accelerate"))
    ]
    assert not noise, "\n".join(noise)
