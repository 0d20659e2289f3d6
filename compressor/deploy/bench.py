"""Latency of student vs teacher, side by side in one run.

Each (model, runtime, round) is timed in its own process with fixed thread counts; teacher and
student alternate; p50/p90/p99 are pooled over rounds. onnxruntime is the main runtime (CUDA
provider when present), torch eager the second baseline. The FLOP ratio of the two shapes is the
ideal speedup the measured one is compared with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from compressor.deploy.runtime import onnx_providers, ort_session
from compressor.environment import cpu_model, package_versions
from compressor.shapes import Shape


def encoder_flops(s: Shape, seq: int) -> int:
    """Multiply-adds x 2 of one sequence through the encoder layers (embeddings/heads excluded)."""
    d, a, i, t = s.hidden, s.attn_width, s.ffn, seq
    per_layer = 2 * t * d * a * 3 + 2 * t * t * a * 2 + 2 * t * a * d + 2 * t * d * i * 2
    return s.layers * per_layer


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "n": len(ms)}  # fmt: skip


def _inputs(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1000, 20000, (batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def time_in_this_process(spec: dict[str, Any]) -> dict[str, list[float]]:
    """Worker: time one model on one runtime over the grid; returns ms per call per grid point."""
    threads, warmup, iters = spec["threads"], spec["warmup"], spec["iters"]
    if spec["runtime"].startswith("onnxruntime"):
        sess = ort_session(Path(spec["path"]), threads, cpu_only=False)
        names = {i.name for i in sess.get_inputs()}

        def call(feed):
            sess.run(None, {k: v for k, v in feed.items() if k in names})
    else:
        import torch
        from transformers import AutoModel

        torch.set_num_threads(threads)
        model = AutoModel.from_pretrained(spec["path"]).eval()

        def call(feed):
            with torch.inference_mode():
                model(**{k: torch.from_numpy(v) for k, v in feed.items()})

    out: dict[str, list[float]] = {}
    for batch, seq in spec["grid"]:
        feed = _inputs(batch, seq)
        for _ in range(warmup):
            call(feed)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            call(feed)
            times.append((time.perf_counter() - t0) * 1000)
        out[f"b{batch}_t{seq}"] = times
    return out


def _run_worker(spec: dict[str, Any]) -> dict[str, list[float]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    res = subprocess.run([sys.executable, "-m", "compressor.deploy.bench", json.dumps(spec)],
                         capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {spec['path']}:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def benchmark(
    models: dict[str, dict[str, str]],
    shapes: dict[str, Shape],
    grid: list[tuple[int, int]],
    threads: int = 2,
    warmup: int = 5,
    iters: int = 30,
    rounds: int = 2,
) -> dict[str, Any]:
    """models: {"teacher"|"student": {"onnxruntime": model.onnx, "torch": hf_dir}}."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    runtimes = sorted({rt for m in models.values() for rt in m})
    for r in range(rounds):
        order = ["teacher", "student"] if r % 2 == 0 else ["student", "teacher"]
        for runtime in runtimes:
            for who in order:
                spec = {"path": str(models[who][runtime]), "runtime": runtime, "grid": grid,
                        "threads": threads, "warmup": warmup, "iters": iters}  # fmt: skip
                for point, ms in _run_worker(spec).items():
                    samples.setdefault((who, runtime, point), []).extend(ms)
    results = []
    for runtime in runtimes:
        for batch, seq in grid:
            point = f"b{batch}_t{seq}"
            t = percentiles(samples[("teacher", runtime, point)])
            s = percentiles(samples[("student", runtime, point)])
            flop_ratio = encoder_flops(shapes["teacher"], seq) / encoder_flops(
                shapes["student"], seq
            )
            speedup = t["p50"] / s["p50"]
            results.append({"runtime": runtime, "batch": batch, "seq": seq, "teacher_ms": t,
                            "student_ms": s, "speedup_p50": speedup, "flop_ratio": flop_ratio,
                            "speedup_over_flop_ratio": speedup / flop_ratio})  # fmt: skip
    return {
        "results": results,
        "threads": threads,
        "warmup": warmup,
        "iters_per_round": iters,
        "rounds": rounds,
        "providers": onnx_providers(),
        "cpu": cpu_model(),
        "shapes": {k: v.to_dict() for k, v in shapes.items()},
        "packages": package_versions(),
    }


def fp32_speedup(bench: dict[str, Any] | None) -> float | None:
    """onnxruntime fp32 p50 speedup at the first benchmarked shape (None without a benchmark)."""
    rows = [r for r in (bench or {}).get("results", []) if r["runtime"] == "onnxruntime"]
    return rows[0]["speedup_p50"] if rows else None


def format_table(bench: dict[str, Any]) -> str:
    head = f"{'runtime':<24} {'batch':>5} {'seq':>4} {'teacher p50':>12} {'student p50':>12} {'speedup':>8} {'FLOP ratio':>10} {'of ideal':>8}"
    lines = [head, "-" * len(head)]
    for r in bench["results"]:
        lines.append(
            f"{r['runtime']:<24} {r['batch']:>5} {r['seq']:>4} {r['teacher_ms']['p50']:>10.2f}ms"
            f" {r['student_ms']['p50']:>10.2f}ms {r['speedup_p50']:>7.2f}x {r['flop_ratio']:>9.2f}x"
            f" {r['speedup_over_flop_ratio']:>7.0%}"
        )
    lines.append(f"threads={bench['threads']} rounds={bench['rounds']} cpu={bench['cpu']}")
    return "\n".join(lines)


def write_benchmark(bench: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(bench, indent=2))


if __name__ == "__main__":
    print(json.dumps(time_in_this_process(json.loads(sys.argv[1]))))
