"""Random-kill loop: SIGKILL a real `compress run` at random moments, resume it each time, and
check that the final model equals an uninterrupted run's, bit for bit.

    python tools/random_kill_loop.py --kills 5                 # the tiny recipe, 5 kills
    python tools/random_kill_loop.py --kills 20 --corrupt 0.3  # and damage the checkpoint
    python tools/random_kill_loop.py --kills 3 --recipe recipes/tiny-test.yaml --seed 7 \
        --out /tmp/kill-loop --min-wait 5 --max-wait 60

Each round starts (or resumes) the run in a subprocess and kills it with SIGKILL after a random
wait in [--min-wait, --max-wait] seconds (counted once the run directory exists). With probability
--corrupt, one byte of the newest checkpoint is flipped after the kill (when an older one
remains): the resume must notice (a "damaged" line) and continue from the previous checkpoint. After --kills kills the run is
resumed to the end, then the same recipe is run once without interruption and both models are
compared (safetensors, every tensor bit for bit). Registration in the zoo and the ONNX export are
left out (training is what is exercised).

Prints one JSON line of counts (kills, resumes, runs that exited before their kill, damaged
checkpoints seen, tracebacks seen, the largest weight difference) and exits 0 only when the
models are identical and no traceback was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.rundir import (  # noqa: E402
    CHECKPOINT_FILE,
    CHECKPOINT_PREV_FILE,
    MODEL_DIR,
    RECIPE_FILE,
    SUMMARY_FILE,
)

CLI = [sys.executable, "-m", "compressor"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    recipe = write_recipe(Path(args.recipe), out)
    counts = {"kills": 0, "resumes": 0, "exited_before_kill": 0, "corrupted": 0,
              "damaged_seen": 0, "tracebacks": 0}  # fmt: skip
    run_dir = None
    for _ in range(args.kills):
        cmd = resume_cmd(run_dir) if run_dir else start_cmd(recipe, out / "killed")
        counts["resumes"] += run_dir is not None
        log = run_once(cmd, rng.uniform(args.min_wait, args.max_wait), counts, out / "killed")
        run_dir = run_dir or find_run_dir(out / "killed")
        count_log(log, counts)
        if run_dir and (run_dir / SUMMARY_FILE).exists():
            break
        if run_dir and rng.random() < args.corrupt and corrupt(run_dir, rng):
            counts["corrupted"] += 1
    if run_dir is None:
        print("the run never created its run directory", file=sys.stderr)
        return 1
    if not (run_dir / SUMMARY_FILE).exists():
        counts["resumes"] += 1
        count_log(finish(resume_cmd(run_dir)), counts)
    count_log(finish(start_cmd(recipe, out / "straight")), counts)
    diff = max_difference(run_dir, find_run_dir(out / "straight"))
    counts["max_abs_difference"] = diff
    print(json.dumps(counts))
    return 0 if diff == 0.0 and counts["tracebacks"] == 0 else 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-test.yaml"))
    p.add_argument("--out", default="/tmp/random-kill-loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corrupt", type=float, default=0.3, help="chance of a flipped byte per kill")
    p.add_argument("--min-wait", type=float, default=10.0)
    p.add_argument("--max-wait", type=float, default=60.0)
    return p.parse_args()


def write_recipe(src: Path, out: Path) -> Path:
    """The recipe without export and registration, in `out` (emptied first)."""
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    raw = yaml.safe_load(src.read_text())
    raw["export"] = {**raw.get("export", {}), "onnx": False}
    raw.setdefault("zoo", {})["register"] = False
    path = out / src.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start_cmd(recipe: Path, output: Path) -> list[str]:
    return [*CLI, "run", str(recipe), "--output", str(output), "--no-register"]


def resume_cmd(run_dir: Path) -> list[str]:
    return [*CLI, "run", "--resume", str(run_dir), "--no-register"]


def run_once(cmd: list[str], wait: float, counts: dict, root: Path) -> str:
    """Start `cmd`, SIGKILL it `wait` seconds after its run directory exists (if still running);
    its stderr."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    while find_run_dir(root) is None and proc.poll() is None:
        time.sleep(0.2)
    try:
        _, err = proc.communicate(timeout=wait)
        counts["exited_before_kill"] += 1
        return err
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        counts["kills"] += 1
        return proc.communicate()[1]


def finish(cmd: list[str]) -> str:
    done = subprocess.run(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        print(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}", file=sys.stderr)
    return done.stderr


def count_log(stderr: str, counts: dict) -> None:
    counts["tracebacks"] += stderr.count("Traceback (most recent call last)")
    counts["damaged_seen"] += stderr.count("is damaged")


def find_run_dir(root: Path) -> Path | None:
    found = sorted(root.glob(f"*/*/{RECIPE_FILE}"))
    return found[0].parent if found else None


def corrupt(run_dir: Path, rng: random.Random) -> bool:
    """Flip one byte of the newest checkpoint, where an older one remains to fall back to."""
    path = run_dir / CHECKPOINT_FILE
    if not (path.exists() and (run_dir / CHECKPOINT_PREV_FILE).exists()):
        return False
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 0xFF
    path.write_bytes(bytes(data))
    return True


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = (load_file(d / MODEL_DIR / "model.safetensors") for d in (a, b))
    if x.keys() != y.keys():
        return float("inf")
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


if __name__ == "__main__":
    raise SystemExit(main())
