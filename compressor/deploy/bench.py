"""Latency of student vs teacher, side by side in one run.

Each (model, runtime, round) is timed in its own process with fixed thread counts; teacher and
student alternate round by round; p50/p90/p99 are pooled over rounds. onnxruntime is the main
runtime (CUDA provider when present), torch eager the second baseline. The FLOP ratio of the two
shapes is the ideal speedup the measured one is compared with.

Noise: beside each median stands its spread, the interquartile range of the pooled calls over
their median ((p75 - p25) / p50; a round slower than the others widens it too). A measurement whose
teacher or student spread exceeds the bound (`bench.max_spread`) is noisy: the whole benchmark is
measured again (`bench.remeasure` times at most) and the least noisy attempt is kept. If it is
still noisy, benchmark.json says so (`noisy`, per result and overall), the table ends with a NOISY
line, and the zoo shows the speedup as noisy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compressor.deploy.runtime import onnx_providers, ort_session
from compressor.environment import cpu_model, package_versions
from compressor.flops import encoder_flops
from compressor.shapes import Shape


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "n": len(ms), "spread": relative_spread(ms)}  # fmt: skip


def relative_spread(ms: list[float]) -> float:
    """(p75 - p25) / p50 of the timings: 0 for identical calls, NaN for none."""
    if not len(ms):
        return float("nan")
    p25, p50, p75 = np.percentile(np.asarray(ms, dtype=float), [25, 50, 75])
    return float((p75 - p25) / p50) if p50 > 0 else float("nan")


def is_noisy(result: dict[str, Any], bound: float) -> bool:
    """A result whose teacher or student spread is above the bound (NaN counts as noisy)."""
    return not all(result[who]["spread"] <= bound for who in ("teacher_ms", "student_ms"))


def worst_spread(results: list[dict[str, Any]]) -> float:
    """The largest teacher or student spread of a benchmark (NaN if any is NaN)."""
    spreads = [r[who]["spread"] for r in results for who in ("teacher_ms", "student_ms")]
    return float("nan") if any(np.isnan(spreads)) else max(spreads)


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


Worker = Callable[[dict[str, Any]], dict[str, list[float]]]


def benchmark(
    models: dict[str, dict[str, str]],
    shapes: dict[str, Shape],
    grid: list[tuple[int, int]],
    threads: int = 2,
    warmup: int = 5,
    iters: int = 30,
    rounds: int = 2,
    max_spread: float = 0.1,
    remeasure: int = 2,
    worker: Worker | None = None,
) -> dict[str, Any]:
    """models: {"teacher"|"student": {"onnxruntime": model.onnx, "torch": hf_dir}}. A noisy
    measurement is taken again up to `remeasure` times; the least noisy attempt is kept.
    `worker` times one spec (default: a fresh process per spec)."""
    settings = {"threads": threads, "warmup": warmup, "iters": iters}
    attempts = []
    for _ in range(1 + remeasure):
        results = measure(models, shapes, grid, settings, rounds, worker or _run_worker)
        attempts.append(results)
        if not any(is_noisy(r, max_spread) for r in results):
            break
    results = min(attempts, key=lambda rs: np.nan_to_num(worst_spread(rs), nan=np.inf))
    for r in results:
        r["noisy"] = is_noisy(r, max_spread)
    return {
        "results": results,
        "noisy": any(r["noisy"] for r in results),
        "max_spread": max_spread,
        "worst_spread": worst_spread(results),
        "attempts": len(attempts),
        "threads": threads,
        "warmup": warmup,
        "iters_per_round": iters,
        "rounds": rounds,
        "providers": onnx_providers(),
        "cpu": cpu_model(),
        "shapes": {k: v.to_dict() for k, v in shapes.items()},
        "packages": package_versions(),
    }


def measure(
    models: dict[str, dict[str, str]],
    shapes: dict[str, Shape],
    grid: list[tuple[int, int]],
    settings: dict[str, int],
    rounds: int,
    worker: Worker,
) -> list[dict[str, Any]]:
    """One attempt: `rounds` rounds, teacher and student alternating, one result per runtime and
    grid point, with the per-round speedups beside the pooled one."""
    samples: dict[tuple[str, str, str], list[list[float]]] = {}
    runtimes = sorted({rt for m in models.values() for rt in m})
    for r in range(rounds):
        order = ["teacher", "student"] if r % 2 == 0 else ["student", "teacher"]
        for runtime in runtimes:
            for who in order:
                spec = {"path": str(models[who][runtime]), "runtime": runtime, "grid": grid,
                        **settings}  # fmt: skip
                for point, ms in worker(spec).items():
                    samples.setdefault((who, runtime, point), []).append(ms)
    results = []
    for runtime in runtimes:
        for batch, seq in grid:
            point = f"b{batch}_t{seq}"
            t_rounds, s_rounds = (
                samples[("teacher", runtime, point)],
                samples[("student", runtime, point)],
            )
            t = percentiles([x for ms in t_rounds for x in ms])
            s = percentiles([x for ms in s_rounds for x in ms])
            flop_ratio = encoder_flops(shapes["teacher"], seq) / encoder_flops(
                shapes["student"], seq
            )
            speedup = t["p50"] / s["p50"]
            per_round = [
                float(np.median(a) / np.median(b)) for a, b in zip(t_rounds, s_rounds, strict=True)
            ]
            results.append({"runtime": runtime, "batch": batch, "seq": seq, "teacher_ms": t,
                            "student_ms": s, "speedup_p50": speedup, "speedup_per_round": per_round,
                            "flop_ratio": flop_ratio,
                            "speedup_over_flop_ratio": speedup / flop_ratio})  # fmt: skip
    return results


def fp32_result(
    bench: dict[str, Any] | None, batch: int | None = None, seq: int | None = None
) -> dict[str, Any] | None:
    """The onnxruntime fp32 result at (batch, seq), by default the first benchmarked shape; None
    without a benchmark or when that shape was not benchmarked."""
    rows = [r for r in (bench or {}).get("results", []) if r["runtime"] == "onnxruntime"]
    if batch is not None or seq is not None:
        rows = [r for r in rows if (r["batch"], r["seq"]) == (batch, seq)]
    return rows[0] if rows else None


def fp32_speedup(bench: dict[str, Any] | None) -> float | None:
    """onnxruntime fp32 p50 speedup at the first benchmarked shape (None without a benchmark)."""
    row = fp32_result(bench)
    return row["speedup_p50"] if row else None


def spread_text(ms: dict[str, Any]) -> str:
    """A median with its spread, e.g. `12.31ms ±4%` (benchmarks made before the spread: no ±)."""
    spread = ms.get("spread")
    return f"{ms['p50']:.2f}ms" + ("" if spread is None else f" ±{spread:.0%}")


def noise_line(bench: dict[str, Any]) -> str | None:
    """The warning a noisy benchmark prints under its table; None for a clean one."""
    if not bench.get("noisy"):
        return None
    return (
        f"NOISY: a teacher or student spread ((p75 - p25) / p50) is {bench['worst_spread']:.0%},"
        f" above the bound {bench['max_spread']:.0%}, after {bench['attempts']} attempt(s); the"
        " speedups marked NOISY are not reliable. Re-run `compress bench RUN_DIR` on a quiet machine."
    )


def format_table(bench: dict[str, Any]) -> str:
    head = f"{'runtime':<24} {'batch':>5} {'seq':>4} {'teacher p50':>15} {'student p50':>15} {'speedup':>8} {'FLOP ratio':>10} {'of ideal':>8}"
    lines = [head, "-" * len(head)]
    for r in bench["results"]:
        lines.append(
            f"{r['runtime']:<24} {r['batch']:>5} {r['seq']:>4} {spread_text(r['teacher_ms']):>15}"
            f" {spread_text(r['student_ms']):>15} {r['speedup_p50']:>7.2f}x {r['flop_ratio']:>9.2f}x"
            f" {r['speedup_over_flop_ratio']:>7.0%}" + ("  NOISY" if r.get("noisy") else "")
        )
    lines.append(f"threads={bench['threads']} rounds={bench['rounds']} cpu={bench['cpu']}")
    if "max_spread" in bench:
        lines.append(f"spread bound {bench['max_spread']:.0%}, attempts {bench['attempts']}")
    warning = noise_line(bench)
    return "\n".join(lines + ([warning] if warning else []))


def write_benchmark(bench: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(bench, indent=2))


if __name__ == "__main__":
    print(json.dumps(time_in_this_process(json.loads(sys.argv[1]))))
