"""Count what the recipe fuzzer finds in a source tree, without stopping at the first failure.

    python tools/reliability/fuzz_census.py --examples 2000                     # this tree
    python tools/reliability/fuzz_census.py --tree /tmp/old --examples 2000     # another checkout

The examples are drawn by tests/reliability/test_recipe_fuzz.py's strategies (mutated packaged
recipes of the tree, damaged bytes and encodings, hostile YAML) with a fixed seed, and each is fed
to that tree's `compress recipe check` (click's CliRunner) and `load_recipe`. A tree without
tests/reliability/ gets this tree's copy of it (and of tests/helpers.py, if it has none). Each
example runs under a time and memory limit (an alias bomb can eat either). Prints one JSON line: examples, passed, refused (exit 2, one
`error:` message), escaped (an exception that would print a traceback, by type), other exits,
runaway messages, timeouts, and the same for the library path (`load_recipe` raising anything but
RecipeError).
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import shutil
import signal
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]
# under tests/: the fuzzer, its Hypothesis profiles and the test kit they import
FUZZ_FILES = (
    "helpers.py",
    "reliability/__init__.py",
    "reliability/conftest.py",
    "reliability/test_recipe_fuzz.py",
)


class Timeout(Exception):
    pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=str(HERE), help="the checkout whose code is fuzzed")
    p.add_argument("--examples", type=int, default=1000, help="examples per path")
    p.add_argument("--seconds", type=int, default=20, help="time limit per example")
    p.add_argument("--memory-gib", type=float, default=3.0, help="address-space limit")
    args = p.parse_args()
    tree = Path(args.tree).resolve()
    tests = tree / "tests"
    if not (tests / "reliability" / "test_recipe_fuzz.py").exists():
        (tests / "reliability").mkdir(parents=True, exist_ok=True)
        for name in FUZZ_FILES:
            if not (tests / name).exists():
                shutil.copyfile(HERE / "tests" / name, tests / name)
    sys.path.insert(0, str(tree))
    limit = int(args.memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, alarm)
    print(json.dumps({"tree": str(tree), **census(args.examples, args.seconds)}))
    return 0


def alarm(signum, frame):
    raise Timeout


def census(examples: int, seconds: int) -> dict:
    from click.testing import CliRunner
    from hypothesis import HealthCheck, Phase, given, settings

    from compressor.cli.main import main as cli
    from compressor.errors import RecipeError
    from compressor.recipe import load_recipe
    from tests.reliability import test_recipe_fuzz as fuzz

    counts = {"cli": collections.Counter(), "library": collections.Counter()}
    escaped = {"cli": collections.Counter(), "library": collections.Counter()}
    work = Path(tempfile.mkdtemp(prefix="fuzz-census-"))
    once = settings(max_examples=examples, phases=[Phase.generate], deadline=None, database=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))  # fmt: skip

    @once
    @given(data=fuzz.recipe_bytes)
    def through_cli(data):
        path = work / "r.yaml"
        path.write_bytes(data)
        counts["cli"]["examples"] += 1
        try:
            signal.alarm(seconds)
            res = CliRunner().invoke(cli, ["recipe", "check", str(path)])
        except Timeout:
            counts["cli"]["timeouts"] += 1
            return
        finally:
            signal.alarm(0)
        if isinstance(res.exception, Timeout):
            counts["cli"]["timeouts"] += 1
        elif res.exception is not None and not isinstance(res.exception, SystemExit):
            counts["cli"]["escaped"] += 1
            escaped["cli"][type(res.exception).__name__] += 1
        elif "Traceback" in res.output:
            counts["cli"]["traceback_printed"] += 1
        elif res.exit_code == 0:
            counts["cli"]["passed"] += 1
        elif res.exit_code == 2 and res.output.startswith("error:"):
            counts["cli"]["refused"] += 1
        else:
            counts["cli"][f"exit_{res.exit_code}"] += 1
        if len(res.output) >= fuzz.MAX_OUTPUT:
            counts["cli"]["runaway_message"] += 1

    @once
    @given(doc=fuzz.mutated_recipes())
    def through_library(doc):
        path = work / "l.yaml"
        path.write_text(fuzz.dump(doc), encoding="utf-8", errors="surrogatepass")
        counts["library"]["examples"] += 1
        try:
            signal.alarm(seconds)
            load_recipe(path)
            counts["library"]["passed"] += 1
        except RecipeError:
            counts["library"]["refused"] += 1
        except Timeout:
            counts["library"]["timeouts"] += 1
        except Exception as err:  # what escapes is what we count
            counts["library"]["escaped"] += 1
            escaped["library"][type(err).__name__] += 1
        finally:
            signal.alarm(0)

    through_cli()
    through_library()
    shutil.rmtree(work, ignore_errors=True)
    return {
        path: {**counts[path], "escaped_by_type": dict(escaped[path].most_common())}
        for path in counts
    }


if __name__ == "__main__":
    raise SystemExit(main())
