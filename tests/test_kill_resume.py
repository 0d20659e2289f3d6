"""SIGKILL a real `compress run` mid-training, resume it, and get the uninterrupted model; the same
for a run that streams its text from a local file, which must continue at the exact next sequence."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from compressor import pipeline
from compressor.checkpoint import load_checkpoint
from compressor.metrics import read_metrics
from tests.helpers import RECIPES, fake_texts

CLI = [sys.executable, "-m", "compressor"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def kill_after_a_checkpoint(recipe: Path, output: Path, after_step: int = 0) -> Path:
    """Start `compress run RECIPE`, SIGKILL it once a checkpoint exists and step `after_step` is
    logged (its checkpoint, when it writes one, comes after that record); its run directory."""
    log = (output.parent / f"{output.name}.log").open("w+")
    proc = subprocess.Popen([*CLI, "run", str(recipe), "--output", str(output)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    deadline = time.time() + 900
    ckpts, reached = [], False
    while time.time() < deadline and proc.poll() is None:
        ckpts = list(output.glob("*/*/checkpoint.pt"))
        reached = bool(ckpts) and logged_step(ckpts[0].parent) >= after_step
        if reached:
            break
        time.sleep(0.05)
    if not (reached and proc.poll() is None):
        log.seek(0)
        raise AssertionError(f"the run ended or timed out before the kill: {log.read()[-2000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = ckpts[0].parent
    assert not (run_dir / "summary.json").exists()  # it really died mid-training
    return run_dir


def logged_step(run_dir: Path) -> int:
    """The last training step in the run's metrics.jsonl (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}") and '"loss_total"' in x]
    return max(steps, default=0)


def resume(run_dir: Path) -> None:
    done = subprocess.run([*CLI, "run", "--resume", str(run_dir)], env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def max_weight_diff(a: Path, b: Path) -> float:
    x, y = (
        load_file(a / "model" / "model.safetensors"),
        load_file(b / "model" / "model.safetensors"),
    )
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    raw = yaml.safe_load((RECIPES / "tiny-test.yaml").read_text())
    raw["name"] = "tiny-kill"
    raw["train"].update(steps=30, checkpoint_every=2)
    raw["pruning"].update(end_step=20, interval=2)
    recipe = tmp_path / "tiny-kill.yaml"
    recipe.write_text(yaml.safe_dump(raw))

    run_dir = kill_after_a_checkpoint(recipe, tmp_path / "killed")
    resume(run_dir)
    straight = pipeline.run(recipe, output=tmp_path / "straight")
    assert max_weight_diff(straight.run_dir, run_dir) <= 1e-5


@pytest.mark.slow
def test_a_streamed_run_killed_and_resumed_continues_at_the_next_sequence(tmp_path):
    """Local text streamed through `datasets` in shuffled windows: after the SIGKILL the resumed
    run takes each step's sequences exactly where the checkpoint left the stream, so every step's
    loss after the checkpoint, and the final weights, are the uninterrupted run's. (That resuming
    reads one window whatever the position: tests/test_data.py, `texts_read`.)"""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(fake_texts(400)) + "\n")
    raw = yaml.safe_load((RECIPES / "tiny-test.yaml").read_text())
    raw["name"] = "tiny-stream-kill"
    raw["data"] = {"source": "files", "files": [str(corpus)], "streaming": True,
                   "shuffle_buffer": 16, "max_length": 32, "heldout": 4, "quality_texts": 8}  # fmt: skip
    raw["train"].update(steps=10, checkpoint_every=2)
    raw["pruning"].update(end_step=6, interval=2)
    raw["export"], raw["bench"] = {"onnx": False}, {"enabled": False}
    recipe = tmp_path / "tiny-stream-kill.yaml"
    recipe.write_text(yaml.safe_dump(raw))

    run_dir = kill_after_a_checkpoint(recipe, tmp_path / "killed", after_step=7)
    saved = load_checkpoint(run_dir)
    # killed past step 7: the checkpoint of step 6 or later, a stream position past a window
    assert saved.step >= 6 and (saved.data["epoch"], saved.data["window"]) >= (0, 1)
    resume(run_dir)
    straight = pipeline.run(recipe, output=tmp_path / "straight", register=False)

    def losses(d: Path) -> dict[int, float]:
        return {r["step"]: r["loss_total"] for r in read_metrics(d / "metrics.jsonl")
                if "loss_total" in r}  # fmt: skip

    got, want = losses(run_dir), losses(straight.run_dir)
    assert sorted(got) == sorted(want) == list(range(1, 11))  # each step once, none skipped
    after = [s for s in want if s > saved.step]
    assert after and all(abs(got[s] - want[s]) <= 1e-5 * max(1.0, abs(want[s])) for s in after)
    assert max_weight_diff(straight.run_dir, run_dir) <= 1e-5
