"""The prepared GPU check (tools/gpu/gpu_check.sh -> tools/gpu/gpu_check.py) runs end to end on a CPU in
its tiny mode and reports every field; on a GPU it is the same command without the CPU flags."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

FIELDS = ["tokens_per_s", "projected_full_budget_hours", "peak_memory", "mfu", "step0_identity_max_abs_fp32",
          "step0_identity_max_abs_bf16", "masked_vs_slim_max_abs_fp32",
          "masked_vs_slim_max_abs_bf16", "onnx_cpu_max_abs", "onnx_cuda", "passed"]  # fmt: skip


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
    assert report["step0_identity_max_abs_fp32"] <= 1e-5
    assert 0 < report["step0_identity_max_abs_bf16"] <= report["step0_identity_bf16_limit"]
    assert report["masked_vs_slim_bf16_passed"] and report["onnx_cpu_passed"]
    assert report["onnx_cuda"].startswith("not installed")
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "verify.json").exists()
