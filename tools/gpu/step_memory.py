"""Bytes allocated by the temporaries of one training micro-step (issue 23, item 3) at the
BERT-base shape with random weights, as the loop runs it (tools/gpu/bench_step.py's `Worker`: the
masking, the teacher's forward, the student's forward, loss and backward, the importance update,
clipping, AdamW). Three states of the student: `full` (before the first pruning event: every mask
full), `masked` (the masks at the recipe's target, not cut: a run without progressive slimming,
where the masked LayerNorm runs) and `slim` (cut to the target). With `--at REV` the same is
measured on an older tree too (a temporary worktree, its own process), side by side.

Measured with torch.profiler (profile_memory=True): every allocation and free of one micro-step,
after a warm-up step, in time order. Two numbers per step: `allocated`, the sum of the sizes of
every tensor allocated during the step (each is written at least once: a floor on the memory
traffic of temporaries), and `peak`, the most bytes live at once above what was live when the
step began (the step's temporaries, what bounds the micro-batch on a GPU). On a CPU, autocast
keeps softmax in bf16 (so the attentions are bf16); on a GPU it runs softmax and layer_norm in
fp32, so the numbers there differ.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python tools/gpu/step_memory.py --at fdaa104
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATES = ("full", "masked", "slim")
MARK = "step_memory.micro_step"
GIB = 2**30


def profile_step(w, state: str) -> dict:  # w: bench_step.Worker
    """One training step of `w` in `state` under the profiler: (allocated, peak) bytes of its
    micro-step (train/step.py `micro_step`: the teacher's forward, the student's forward, loss
    and backward) and of the whole step (with the importance update, clipping and AdamW)."""
    from torch._C._profiler import _EventType
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    import compressor.train.step as step

    to_state(w, state)
    w.one_step()  # warm-up: the optimizer's moments, first touch of every buffer
    real = step.micro_step

    def marked(*args, **kw):
        with record_function(MARK):
            return real(*args, **kw)

    step.micro_step = marked
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            w.one_step()
    finally:
        step.micro_step = real
    events: dict[str, list] = {"micro": [], "step": []}
    stack = [(e, False) for e in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        e, inside = stack.pop()
        inside = inside or e.name == MARK
        stack.extend((c, inside) for c in e.children)
        if e.tag == _EventType.Allocation:
            size = e.extra_fields.alloc_size
            events["step"].append((e.start_time_ns, size))
            if inside:
                events["micro"].append((e.start_time_ns, size))
    return {k: allocated_and_peak(v) for k, v in events.items()}


def allocated_and_peak(events: list[tuple[int, int]]) -> dict[str, int]:
    """Sizes allocated (positive) and freed (negative) in time order: their sum of allocations
    and the most bytes live at once above the start."""
    live = peak = allocated = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
        allocated += max(size, 0)
    return {"allocated": allocated, "peak": peak}


def to_state(w, name: str) -> None:
    """full -> masked -> slim, forward only (bench_step.Worker.to_state, with `masked` between:
    the target's masks set, removed layers faded to 0, nothing cut)."""
    if name == w.current:
        return
    from compressor.pipeline import magnitude_masks_at_target
    from compressor.prune.masks import zero_pruned_weights
    from compressor.prune.progressive import Units

    s = w.state
    if w.current == "full":
        s.set_masks(magnitude_masks_at_target(w.recipe, w.teacher).to(w.device))
        s.fade_layers(0.0)
        zero_pruned_weights(s.student, s.masks)
        w.current = "masked"
    if name == "slim":
        s.cut(Units.kept(s.masks))
        w.current = "slim"


def serve(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_step import Worker

    import compressor

    w = Worker(a)
    tree = str(Path(compressor.__file__).parent.parent)
    for state in STATES:
        print(json.dumps({"tree": tree, "state": state, **profile_step(w, state)}), flush=True)


def run_tree(label: str, tree: Path, a: argparse.Namespace) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(a.threads)}  # fmt: skip
    args = [sys.executable, __file__, "--worker", "--device", a.device, "--precision",
            a.precision, "--batch", str(a.batch), "--seq", str(a.seq), "--threads",
            str(a.threads)]  # fmt: skip
    out = subprocess.run(args, env=env, cwd=tree, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{label}: the worker stopped:\n{out.stderr[-2000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if any(Path(r["tree"]).resolve() != tree.resolve() for r in rows):
        sys.exit(f"{label}: imported compressor from {rows[0]['tree']}, not {tree}")
    return {r["state"]: r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--at", help="a git revision to measure beside this tree (a temporary worktree)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        serve(a)
        return
    if a.device != "cpu":
        sys.exit("--device: the profiler's allocation events are read on the CPU only")
    tmp, trees = None, [("new", ROOT)]
    try:
        if a.at:
            tmp = Path(tempfile.mkdtemp(prefix="step-memory-"))
            subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), a.at],
                           cwd=ROOT, check=True, capture_output=True)  # fmt: skip
            trees.insert(0, (f"old ({a.at})", tmp / "tree"))
        results = {label: run_tree(label, tree, a) for label, tree in trees}
    finally:
        if tmp is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT,
                           capture_output=True)  # fmt: skip
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"one step, micro-batch {a.batch} x {a.seq}, {a.precision}, {a.device}: GiB allocated"
          " (sum of every new tensor) / GiB peak (above the start)")  # fmt: skip
    for part, name in (("micro", "the micro-step (forwards, loss, backward)"),
                       ("step", "the whole step (with the importance update, AdamW)")):  # fmt: skip
        print(f"{name}:")
        for state in STATES:
            cells = [f"{k} {v[state][part]['allocated'] / GIB:.2f} / {v[state][part]['peak'] / GIB:.2f}"
                     for k, v in results.items()]  # fmt: skip
            line = f"  {state:>6}: " + ", ".join(cells)
            if len(results) == 2:
                old, new = (v[state][part] for v in results.values())
                line += (f"; new/old {new['allocated'] / old['allocated']:.2f}"
                         f" / {new['peak'] / old['peak']:.2f}")  # fmt: skip
            print(line)


if __name__ == "__main__":
    main()
