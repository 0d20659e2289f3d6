"""The test kit's rules: test modules share code only through tests/helpers.py (and conftest.py's
fixtures, and the helper modules beside them), never by importing another test module; nothing
under tests/ imports from tools/."""

import ast
from pathlib import Path

from tests.helpers import ROOT

TESTS = ROOT / "tests"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`, at any depth (function-local imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def offenders(root: Path) -> list[str]:
    """Imports under `root` of a test module (test_*.py or conftest.py) or of tools/."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        for line, module in imported_modules(path):
            first, *rest = module.split(".")
            test_module = first == "tests" and any(
                part.startswith("test_") or part == "conftest" for part in rest
            )
            if test_module or first == "tools":
                bad.append(f"{path.relative_to(root)}:{line}: {module}")
    return bad


def test_no_test_module_imports_another_or_tools():
    assert offenders(TESTS) == []


def test_the_check_finds_planted_imports(tmp_path):
    (tmp_path / "test_a.py").write_text("def f():\n    from tests.test_b import x\n")
    (tmp_path / "test_c.py").write_text("from tests.reliability import conftest\n")
    (tmp_path / "test_d.py").write_text("from tools.results.bench_bert_base import y\n")
    (tmp_path / "test_e.py").write_text("from tests.helpers import ROOT\nimport tests.browser\n")
    assert offenders(tmp_path) == [
        "test_a.py:2: tests.test_b",
        "test_a.py:2: tests.test_b.x",
        "test_c.py:1: tests.reliability.conftest",
        "test_d.py:1: tools.results.bench_bert_base",
        "test_d.py:1: tools.results.bench_bert_base.y",
    ]
