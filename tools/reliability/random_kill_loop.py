"""Random-kill loop: SIGKILL real `compress run`s at random moments (in set-up, training, a
checkpoint's write, export/verify/benchmark, registration), resume each with the command the
tool names, and check that nothing was lost and the result equals an uninterrupted run's.

    python tools/reliability/random_kill_loop.py --kills 30                # the tiny recipe, 30 kills
    python tools/reliability/random_kill_loop.py --kills 5 --corrupt 0     # no damaged checkpoints
    python tools/reliability/random_kill_loop.py --kills 3 --recipe recipes/tiny-test.yaml --seed 7 \
        --out /tmp/kill-loop --set train.threads=1

First the recipe runs once uninterrupted (the reference, unless --reference names one; its wall
time T, or --window, sets the kill times).
Then episodes, until --kills kills: an episode starts the recipe and kills it again and again,
each attempt killed by one trigger drawn at random:
  time        SIGKILL at a uniform moment in [0, T] after the start
  checkpoint  SIGKILL as soon as a checkpoint's temporary file appears (mid-write)
  export      SIGKILL at a random moment after onnx/ appears (export, verify, benchmark)
  register    SIGKILL at a random moment after the zoo's staging gets an entry (registration)
A process that ends before its trigger is not killed. With probability --corrupt a kill is
followed by one flipped byte in the newest checkpoint (when the previous one is good): the resume
must say "is damaged" and continue from the previous one. Each next attempt is
`compress run --resume RUN_DIR --zoo Z` (or, once the run is exported, `compress zoo add RUN_DIR
--zoo Z`, which the resume names) until one exits 0.

Checked at the end of every episode: the model (safetensors, every tensor) and plan.json equal
the reference bit for bit, the training losses per step equal the reference's and no step is
logged twice; the run directory holds every artifact, verify.json passed, no checkpoint or
temporary file is left; the run is in the zoo; `compress run --resume` of the finished run exits
2 naming `compress zoo add`. At the end, `compress zoo verify --all` passes on the zoo (every
episode's entry), its staging is empty, and no output of any command held a traceback.

Prints one JSON line of counts (kills by trigger, the stage each kill hit, resumes, episodes,
episodes whose model matched, damaged checkpoints made and reported, tracebacks, lost artifacts,
temporaries left) and exits 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from compressor.rundir import (  # noqa: E402
    CHECKPOINT_FILE,
    CHECKPOINT_PREV_FILE,
    CHECKPOINT_TMP_SUFFIX,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_DIR,
    ONNX_DIR,
    ONNX_MODEL,
    PLAN_FILE,
    RECIPE_FILE,
    RUN_FILES,
    SUMMARY_FILE,
    VERIFY_FILE,
)
from compressor.zoo.store import STAGING  # noqa: E402 - registrations in progress

CLI = [sys.executable, "-m", "compressor"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TRIGGERS = {"time": 0.4, "checkpoint": 0.2, "export": 0.2, "register": 0.2}
TRACEBACK = "Traceback (most recent call last)"
POLL = 0.01  # seconds between looks at the run directory


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    recipe = write_recipe(Path(args.recipe), out)
    counts = collections.Counter()
    hit, problems = collections.Counter(), []

    started = time.time()
    if args.reference:
        reference = Path(args.reference)
    else:
        ref_log = finish(start_cmd(recipe, out / "reference", out / "zoo-ref", args.set, True))
        count_log(ref_log, counts)
        reference = find_run_dir(out / "reference")
    total = args.window or time.time() - started
    if reference is None or not (reference / SUMMARY_FILE).exists():
        print("the reference run did not finish", file=sys.stderr)
        return 1

    zoo = out / "zoo"
    episode = 0
    deadline = time.time() + (args.budget or float("inf"))
    while counts["kills"] < args.kills and episode < args.max_episodes and time.time() < deadline:
        episode += 1
        runs = out / f"episode-{episode}"
        run_dir, done, attempt = None, False, 0
        while not done:
            attempt += 1
            if run_dir is None:
                cmd = start_cmd(recipe, runs, zoo, args.set)
            elif exported(run_dir):
                cmd = [*CLI, "zoo", "add", str(run_dir), "--zoo", str(zoo)]
            else:
                cmd = [*CLI, "run", "--resume", str(run_dir), "--zoo", str(zoo)]
            counts["resumes"] += run_dir is not None
            killable = counts["kills"] < args.kills and attempt <= args.max_attempts
            killable = killable and time.time() < deadline  # then the episode runs to its end
            trigger = rng.choices(list(TRIGGERS), list(TRIGGERS.values()))[0] if killable else None
            since = time.time()
            code, log = attempt_once(cmd, trigger, rng, total, runs, zoo, counts)
            count_log(log, counts)
            run_dir = run_dir or find_run_dir(runs)
            if code is None:  # killed
                hit[stage_of(run_dir, zoo, since)] += 1
                if run_dir and rng.random() < args.corrupt and corrupt(run_dir, rng):
                    counts["corrupted"] += 1
            elif code == 0:
                done = True
            else:
                problems.append(
                    f"episode {episode}: {' '.join(cmd[2:])} exited {code}: {log[-800:]}"
                )
                break
        if done:
            problems += check_episode(run_dir, reference, zoo, counts)
            print(f"episode {episode}: {attempt} attempts, {counts['kills']} kills so far",
                  file=sys.stderr, flush=True)  # fmt: skip

    verify = subprocess.run([*CLI, "zoo", "verify", "--all", "--zoo", str(zoo)], env=ENV,
                            capture_output=True, text=True)  # fmt: skip
    count_log(verify.stdout + verify.stderr, counts)
    if verify.returncode != 0:
        problems.append(f"zoo verify --all exited {verify.returncode}: {verify.stdout[-800:]}")
    left = sorted(p.name for p in (zoo / STAGING).glob("*"))
    if left:
        counts["temporaries_left"] += len(left)
        problems.append(f"left in the zoo's staging: {left}")
    counts["episodes"] = episode
    counts["stage_hit"] = dict(hit)
    counts["reference_seconds"] = round(total, 1)
    counts["problems"] = len(problems)
    print(json.dumps(counts))
    for p in problems:
        print(p, file=sys.stderr)
    ok = not problems and counts["tracebacks"] == 0 and counts["kills"] >= args.kills
    return 0 if ok else 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-test.yaml"))
    p.add_argument("--out", default="/tmp/random-kill-loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corrupt", type=float, default=0.2, help="chance of a flipped byte per kill")
    p.add_argument("--set", action="append", default=["train.threads=1"],
                   help="recipe overrides for every run (default: train.threads=1)")  # fmt: skip
    p.add_argument("--reference", help="an uninterrupted run of the recipe (else one is run)")
    p.add_argument("--window", type=float, default=0.0,
                   help="time kills fall in [0, WINDOW] s (default: the reference's wall time)")  # fmt: skip
    p.add_argument("--max-attempts", type=int, default=12, help="kills per episode at most")
    p.add_argument("--max-episodes", type=int, default=20)
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds after which no more kills are made (the episode then finishes)")  # fmt: skip
    return p.parse_args()


def write_recipe(src: Path, out: Path) -> Path:
    """The recipe, in `out` (emptied first)."""
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    path = out / src.name
    path.write_text(src.read_text())
    return path


def start_cmd(recipe: Path, output: Path, zoo: Path, sets: list[str], no_register=False) -> list:
    cmd = [*CLI, "run", str(recipe), "--output", str(output), "--zoo", str(zoo)]
    cmd += [a for s in sets for a in ("--set", s)]
    return cmd + (["--no-register"] if no_register else [])


def attempt_once(cmd, trigger, rng, total, runs: Path, zoo: Path, counts) -> tuple:
    """Run `cmd`; SIGKILL it when `trigger` fires. (exit code or None if killed, its output)."""
    since = time.time()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    kill_at = since + rng.uniform(0, total) if trigger == "time" else None
    delay = {"export": rng.uniform(0, 10.0), "register": rng.uniform(0, 1.0)}.get(trigger, 0.0)
    while proc.poll() is None and trigger is not None:
        if kill_at is None and fired(trigger, runs, zoo, since):
            kill_at = time.time() + delay
        if kill_at is not None and time.time() >= kill_at:
            proc.send_signal(signal.SIGKILL)
            output = proc.communicate()[0]
            if proc.returncode == -signal.SIGKILL:
                counts["kills"] += 1
                counts[f"kills_{trigger}"] += 1
                return None, output
            return proc.returncode, output
        time.sleep(POLL)
    output = proc.communicate()[0]
    counts["exited_before_kill"] += trigger is not None
    return proc.returncode, output


def fired(trigger: str, runs: Path, zoo: Path, since: float) -> bool:
    """Whether this attempt has written what `trigger` waits for (not an earlier one)."""
    run_dir = find_run_dir(runs)
    if trigger == "register":
        return any(newer(p, since) for p in (zoo / STAGING).glob("*"))
    if run_dir is None:
        return False
    if trigger == "checkpoint":
        return newer(run_dir / (CHECKPOINT_FILE + CHECKPOINT_TMP_SUFFIX), since)
    return any(newer(p, since) for p in (run_dir / ONNX_DIR).glob("*"))


def newer(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:  # not there (yet, or any more)
        return False


def stage_of(run_dir: Path | None, zoo: Path, since: float) -> str:
    """Where a kill landed, from what it left behind (`since`: when the attempt started)."""
    if run_dir is None or not (run_dir / METRICS_FILE).exists():
        return "set-up"
    if newer(run_dir / (CHECKPOINT_FILE + CHECKPOINT_TMP_SUFFIX), since):
        return "checkpoint write"
    if not (run_dir / SUMMARY_FILE).exists():
        return "training"
    if any((zoo / STAGING).glob("*")):
        return "registration"
    if not exported(run_dir):
        return "export/verify/benchmark"
    return "after export (gates, index)"


def exported(run_dir: Path) -> bool:
    summary = run_dir / SUMMARY_FILE
    return summary.exists() and json.loads(summary.read_text()).get("export") is not None


def finish(cmd: list[str]) -> str:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}", file=sys.stderr)
    return done.stdout + done.stderr


def count_log(output: str, counts) -> None:
    counts["tracebacks"] += output.count(TRACEBACK)
    counts["damaged_reported"] += output.count("is damaged")


def find_run_dir(root: Path) -> Path | None:
    found = sorted(root.glob(f"*/*/{RECIPE_FILE}"))
    return found[0].parent if found else None


def corrupt(run_dir: Path, rng: random.Random) -> bool:
    """Flip one byte of the newest checkpoint, where the previous one is good to fall back to."""
    from compressor.checkpoint import Damaged, read_verified

    path, prev = run_dir / CHECKPOINT_FILE, run_dir / CHECKPOINT_PREV_FILE
    if not (path.exists() and prev.exists()):
        return False
    try:
        read_verified(prev)
    except Damaged:
        return False
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 0xFF
    path.write_bytes(bytes(data))
    return True


def check_episode(run_dir: Path, reference: Path, zoo: Path, counts) -> list[str]:
    """Everything an uninterrupted run would have: same model, nothing lost, nothing left over."""
    problems = []
    diff = max_difference(run_dir, reference)
    counts["max_abs_difference"] = max(counts["max_abs_difference"], diff)
    same_plan = (run_dir / PLAN_FILE).read_bytes() == (reference / PLAN_FILE).read_bytes()
    same_losses = losses(run_dir) == losses(reference)
    if diff == 0.0 and same_plan and same_losses:
        counts["episodes_matched"] += 1
    else:
        problems.append(f"{run_dir}: weights differ by {diff}, plan same {same_plan},"
                        f" losses same {same_losses}")  # fmt: skip
    lost = [n for n in (*RUN_FILES, ONNX_MODEL) if not (run_dir / n).exists()]
    if lost or json.loads((run_dir / VERIFY_FILE).read_text()).get("passed") is not True:
        counts["artifacts_lost"] += len(lost) or 1
        problems.append(f"{run_dir}: missing {lost} or verify.json did not pass")
    temporaries = [p.name for p in run_dir.rglob("*") if ".tmp" in p.name]
    temporaries += [n for n in (CHECKPOINT_FILE, CHECKPOINT_PREV_FILE) if (run_dir / n).exists()]
    if temporaries:
        counts["temporaries_left"] += len(temporaries)
        problems.append(f"{run_dir}: left behind {temporaries}")
    if not in_zoo(run_dir, zoo, counts):
        counts["artifacts_lost"] += 1
        problems.append(f"{run_dir}: no zoo entry (indexed, with a manifest) comes from it")
    again = subprocess.run([*CLI, "run", "--resume", str(run_dir)], env=ENV, capture_output=True,
                           text=True)  # fmt: skip
    count_log(again.stdout + again.stderr, counts)
    if again.returncode != 2 or f"compress zoo add {run_dir}" not in again.stderr:
        problems.append(f"{run_dir}: resuming the finished run exited {again.returncode}:"
                        f" {again.stderr[-400:]}")  # fmt: skip
    return problems


def in_zoo(run_dir: Path, zoo: Path, counts) -> bool:
    """An entry whose manifest names `run_dir` as its source, listed by `compress zoo list`."""
    listed = subprocess.run([*CLI, "zoo", "list", "--json", "--zoo", str(zoo)], env=ENV,
                            capture_output=True, text=True)  # fmt: skip
    count_log(listed.stdout + listed.stderr, counts)
    ids = {row["id"] for row in json.loads(listed.stdout or "[]")}
    source = str(run_dir.resolve())
    for manifest in (zoo / "entries").rglob(MANIFEST_FILE):
        m = json.loads(manifest.read_text())
        if m.get("source_run") == source and m.get("id") in ids:
            return True
    return False


def losses(run_dir: Path) -> dict[int, float]:
    """{step: loss_total} of the training log; a step logged twice spoils the comparison."""
    out, seen = {}, set()
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        if "loss_total" in record:
            step = record["step"]
            out[step] = "twice" if step in seen else record["loss_total"]
            seen.add(step)
    return out


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = (load_file(d / MODEL_DIR / "model.safetensors") for d in (a, b))
    if x.keys() != y.keys():
        return float("inf")
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


if __name__ == "__main__":
    raise SystemExit(main())
