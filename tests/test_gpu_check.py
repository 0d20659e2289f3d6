"""The prepared GPU check (tools/gpu/gpu_check.sh -> tools/gpu/gpu_check.py) runs end to end on a CPU in
its tiny mode and reports every field; on a GPU it is the same command without the CPU flags."""

import json
import os
import subprocess
import sys

import pytest

from compressor.flops import projected_seconds
from compressor.recipe import load_recipe
from tests.helpers import RECIPES, ROOT

STEP = [f"{state}_{field}" for state in ("full_width", "slimmed")
        for field in ("tokens_per_s", "mfu", "peak_memory", "syncs_per_step",
                      "device_reads_per_step")]  # fmt: skip
FIELDS = ["step_micro_batch", *STEP, "projected_hours_progressive_slim", "projected_hours_masked",
          "projected_full_budget_hours", "tokens_per_s", "peak_memory", "mfu",
          "step0_identity_max_abs_fp32", "step0_identity_max_abs_bf16",
          "masked_vs_slim_max_abs_fp32", "masked_vs_slim_max_abs_bf16", "onnx_cpu_max_abs",
          "onnx_cuda", "passed"]  # fmt: skip
FULL_BUDGET_TOKENS = 28_000 * 4096 * 128  # recipes/bert-base-to-6L384.yaml


def test_the_projection_weights_each_step_by_its_flops_between_the_two_measured():
    """A step's time is affine in its FLOPs through the two measured steps."""
    full, slim = (10.0, 2.0), (4.0, 0.8)  # (FLOPs, seconds): 0.2 s a FLOP + 0 fixed
    assert projected_seconds([(10.0, 5)], full, slim) == pytest.approx(10.0)
    assert projected_seconds([(4.0, 5)], full, slim) == pytest.approx(4.0)
    assert projected_seconds([(7.0, 2), (4.0, 1)], full, slim) == pytest.approx(2 * 1.4 + 0.8)
    fixed = (10.0, 3.0), (4.0, 1.8)  # 1 s fixed + 0.2 s a FLOP
    assert projected_seconds([(7.0, 1)], *fixed) == pytest.approx(2.4)
    assert projected_seconds([(5.0, 2)], (10.0, 2.0), (10.0, 2.0)) == pytest.approx(2.0)


@pytest.mark.slow
def test_the_gpu_check_runs_on_a_cpu_in_its_tiny_mode(tmp_path):
    env = {**os.environ, "PY": sys.executable, "GPU_CHECK_RUNS": str(tmp_path / "runs"),
           "GPU_CHECK_PACK": str(tmp_path / "no-pack"), "OUT": str(tmp_path),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    res = subprocess.run(["bash", str(ROOT / "tools" / "gpu" / "gpu_check.sh"), "--device", "cpu",
                          "--tiny", "--steps", "3"], env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line)
    assert set(FIELDS) <= printed.keys()
    report = json.loads((tmp_path / "gpu_check.json").read_text())  # copied to $OUT
    assert report["passed"] is True and report["steps"] == 3
    assert report["tokens_per_s"] > 0 and report["mfu"] == "n/a (not a CUDA device)"
    # the step as the recipe runs it (tiny: 4 x 32 tokens, 2 micro-batches), before and after
    assert report["step_micro_batch"].startswith("4 x 32 tokens, 2 micro-batches a step")
    for state in ("full_width", "slimmed"):
        assert report[f"{state}_tokens_per_s"] > 0
        assert report[f"{state}_device_reads_per_step"] == 0, report[f"{state}_device_reads"]
        for field in ("mfu", "peak_memory", "syncs_per_step"):
            assert report[f"{state}_{field}"] == "n/a (not a CUDA device)"
    full, slim = report["full_width_tokens_per_s"], report["slimmed_tokens_per_s"]
    masked = report["projected_hours_masked"]
    assert masked == pytest.approx(FULL_BUDGET_TOKENS / full / 3600, rel=1e-3)
    # between the hours at the slimmed rate all run and at the full width's
    assert FULL_BUDGET_TOKENS / slim / 3600 < report["projected_hours_progressive_slim"] < masked
    written = load_recipe(RECIPES / "bert-base-to-6L384.yaml").pruning.progressive_slim
    assert (
        report["projected_full_budget_hours"]
        == report["projected_hours_progressive_slim" if written else "projected_hours_masked"]
    )
    assert report["step0_identity_max_abs_fp32"] <= 1e-5
    assert 0 < report["step0_identity_max_abs_bf16"] <= report["step0_identity_bf16_limit"]
    assert report["masked_vs_slim_bf16_passed"] and report["onnx_cpu_passed"]
    assert report["onnx_cuda"].startswith("not installed")
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "verify.json").exists()
