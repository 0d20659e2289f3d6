"""The package's architecture, checked: no import cycle (function-local imports included), one
module owns every artifact name, and the light commands start without a deep-learning stack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compressor import rundir
from tests.helpers import ROOT

PACKAGE = ROOT / "compressor"
HEAVY = ("torch", "transformers", "onnxruntime", "datasets", "optimum", "pydantic")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every compressor module `path` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in known}
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p): p for p in root.rglob("*.py")}
    known = set(files)
    graph = {m: imported_modules(p, known) - {m} for m, p in files.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too, but they are
    # empty here, so only real module-to-module edges remain
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "compressor"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("from compressor.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from compressor import a\n")
    files = {".".join(p.relative_to(tmp_path).with_suffix("").parts): p for p in pkg.rglob("*.py")}
    graph = {m: imported_modules(p, set(files)) - {m} for m, p in files.items()}
    assert find_cycle(graph) in (
        ["compressor.a", "compressor.sub.b", "compressor.a"],
        ["compressor.sub.b", "compressor.a", "compressor.sub.b"],
    )


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and any(graph.values())  # the walk really saw the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


# Layers point down. The orchestration (the CLI, the baselines that drive the pipeline, the
# pipeline, the loop and its training state) sits on top; the tool areas below never import it;
# prune/ is pure maths over the model's tensors; the recipe schema imports no tool area.
ORCHESTRATION = ("compressor.cli", "compressor.baselines", "compressor.pipeline",
                 "compressor.distill", "compressor.train")  # fmt: skip
TOOL_AREAS = ("compressor.prune", "compressor.deploy", "compressor.zoo", "compressor.evaluate")
NEVER_IMPORTS = {
    **{area: ORCHESTRATION for area in TOOL_AREAS},
    "compressor.zoo": (*ORCHESTRATION, "compressor.evaluate"),  # evaluate records into the zoo
    "compressor.prune": (
        *ORCHESTRATION,
        *TOOL_AREAS,
        "compressor.gates",
        "compressor.teacher",
        "compressor.data",
        "compressor.recipe",
    ),
    "compressor.recipe": (*ORCHESTRATION, *TOOL_AREAS, "compressor.gates"),
    "compressor.train": (
        "compressor.cli",
        "compressor.baselines",
        "compressor.pipeline",
        "compressor.distill",
    ),
    "compressor.distill": ("compressor.cli", "compressor.baselines", "compressor.pipeline"),
    "compressor.pipeline": ("compressor.cli", "compressor.baselines"),
}


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a `NEVER_IMPORTS` rule, as 'importer -> imported'."""
    return sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        for area, banned in NEVER_IMPORTS.items()
        if within(m, area)
        for d in deps
        if not within(d, area) and any(within(d, b) for b in banned)
    )


def test_the_layering_check_finds_a_planted_upward_import(tmp_path):
    pkg = tmp_path / "compressor"
    (pkg / "zoo").mkdir(parents=True)
    (pkg / "pipeline.py").write_text("from compressor.zoo import store\n")
    (pkg / "zoo" / "store.py").write_text("def f():\n    from compressor import pipeline\n")
    (pkg / "recipe.py").write_text("import compressor.zoo.store\n")
    files = {".".join(p.relative_to(tmp_path).with_suffix("").parts): p for p in pkg.rglob("*.py")}
    graph = {m: imported_modules(p, set(files)) - {m} for m, p in files.items()}
    assert upward_imports(graph) == [
        "compressor.recipe -> compressor.zoo.store",
        "compressor.zoo.store -> compressor.pipeline",
    ]


def test_layers_only_point_down():
    graph = import_graph()
    assert any(within(m, "compressor.zoo") for m in graph)  # the walk saw the folders
    assert upward_imports(graph) == []


def test_only_rundir_spells_an_artifact_name():
    names = {
        v
        for k, v in vars(rundir).items()
        if k.isupper() and isinstance(v, str) and "." in v and "/" not in v
    }
    assert {"summary.json", "metrics.jsonl", "evaluations.json", "manifest.json"} <= names
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert offenders == []


PROBE = """
import sys
from click.testing import CliRunner
from compressor.cli.main import main
res = CliRunner().invoke(main, {args})
heavy = sorted(m for m in {heavy} if m in sys.modules)
print(__import__("json").dumps({{"exit": res.exit_code, "heavy": heavy}}))
"""


@pytest.mark.parametrize(
    "args", [["--help"], ["zoo", "list"], ["zoo", "--help"], ["eval", "--help"]]
)
def test_light_commands_do_not_load_a_deep_learning_stack(args, tmp_path):
    code = PROBE.format(args=args, heavy=HEAVY)
    env = {"COMPRESS_ZOO": str(tmp_path / "zoo"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"exit": 0, "heavy": []}


def test_python_dash_m_compressor_is_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "compressor", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "Usage: compress" in out.stdout and "zoo" in out.stdout and "baselines" in out.stdout


def test_evaluations_keep_their_legacy_name_where_it_exists(tmp_path):
    """Entries registered before 0.2 hold metrics.json; they are read and updated in place."""
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    (old / rundir.LEGACY_EVALS_FILE).write_text('{"evaluations": []}')
    assert rundir.evals_path(new) == new / "evaluations.json"
    assert rundir.evals_path(old) == old / "metrics.json"
