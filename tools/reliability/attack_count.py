"""Count the attack cases of tests/reliability/test_untrusted.py that `compress` withstands, on
this checkout or (`--at REV`) on an older commit, for issue 24's before/after count.

    python tools/reliability/attack_count.py               # this checkout
    python tools/reliability/attack_count.py --at e113121  # the same cases against an older commit

Every test of the module is one case; tests named `test_control_*` are controls (what must still
work), reported apart. With `--at`, the module is copied into a temporary git worktree of REV and
run there (imports from that tree); cases that would exhaust this machine on code without the
bounds (UNSAFE_BEFORE) are not run and count as failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests/reliability/test_untrusted.py"
KIT = "tests/helpers.py"
UNSAFE_BEFORE = ("test_a_run_that_needs_more_memory_than_the_machine_starts_nothing",)


def run_cases(tree: Path, deselect: tuple[str, ...]) -> dict[str, str]:
    """{test id: 'passed' | 'failed' | 'skipped' | 'not run'} of MODULE in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", MODULE]
    for name in deselect:
        args += ["--deselect", f"{MODULE}::{name}"]
    out = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True).stdout
    results = {}
    for line in out.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED)(?: \[\d+\])? (\S+)", line)
        if m:
            status = {"PASSED": "passed", "SKIPPED": "skipped"}.get(m.group(1), "failed")
            results[m.group(2).split(" - ")[0]] = status
    for name in deselect:
        results[f"{MODULE}::{name}"] = "not run"
    if not results:
        sys.exit(f"no results; pytest said:\n{out[-3000:]}")
    return results


def summary(results: dict[str, str]) -> str:
    def count(ids: list[str], status: str) -> int:
        return sum(results[i] == status for i in ids)

    attacks = [i for i in results if "::test_control_" not in i]
    controls = [i for i in results if "::test_control_" in i]
    withstood = count(attacks, "passed")
    lines = [
        f"attack cases: {len(attacks)}; withstood {withstood}, failed"
        f" {len(attacks) - withstood - count(attacks, 'skipped')}"
        f" (of which not run: {count(attacks, 'not run')}), skipped {count(attacks, 'skipped')}",
        f"controls: {len(controls)}; passing {count(controls, 'passed')}",
    ]
    lines += [f"  {results[i]:>8}  {i.split('::', 1)[1]}" for i in sorted(results)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--at", help="a git revision to run the cases against (default: this tree)")
    a = ap.parse_args()
    if a.at is None:
        print(summary(run_cases(ROOT, ())))
        return
    tmp = Path(tempfile.mkdtemp(prefix="attack-count-"))
    tree = tmp / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), a.at], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    try:
        shutil.copyfile(ROOT / MODULE, tree / MODULE)
        if not (tree / KIT).exists():  # an older tree without the test kit the module imports
            shutil.copyfile(ROOT / KIT, tree / KIT)
        print(f"at {a.at}:")
        print(summary(run_cases(tree, UNSAFE_BEFORE)))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                       capture_output=True)  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
