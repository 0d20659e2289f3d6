"""SIGKILL a real `compress run` mid-training, resume it, and get the uninterrupted model."""

import os
import signal
import subprocess
import sys
import time

import yaml
from safetensors.torch import load_file

from compressor import pipeline
from tests.conftest import RECIPES


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    raw = yaml.safe_load((RECIPES / "tiny-test.yaml").read_text())
    raw["name"] = "tiny-kill"
    raw["train"].update(steps=30, checkpoint_every=2)
    raw["pruning"].update(end_step=20, interval=2)
    recipe = tmp_path / "tiny-kill.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    cli = [sys.executable, "-m", "compressor"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    proc = subprocess.Popen([*cli, "run", str(recipe), "--output", str(tmp_path / "killed")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    ckpts = []
    while time.time() < deadline and proc.poll() is None:
        ckpts = list((tmp_path / "killed").glob("*/*/checkpoint.pt"))
        if ckpts:
            break
        time.sleep(0.05)
    assert ckpts, "no checkpoint appeared before the run ended"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = ckpts[0].parent
    assert not (run_dir / "summary.json").exists()  # it really died mid-training

    done = subprocess.run([*cli, "run", "--resume", str(run_dir)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]

    straight = pipeline.run(recipe, output=tmp_path / "straight")
    a = load_file(straight.run_dir / "model" / "model.safetensors")
    b = load_file(run_dir / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
