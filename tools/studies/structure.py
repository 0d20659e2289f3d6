"""Structure numbers of a compressor tree: modules (non-__init__), imports between them (module
level or in functions), floors (the longest import chain) and the flat core (modules directly in
compressor/). The folder-level rules are tests/test_layout.py's.

    python tools/studies/structure.py .            # this checkout
    python tools/studies/structure.py OTHER_TREE   # e.g. a worktree of an older commit
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {
        module_name(root, p): p for p in (root / "compressor").rglob("*.py") if p.stem != "__init__"
    }
    graph = {}
    for m, p in files.items():
        out = set()
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out |= {n for n in names if n in files}
        graph[m] = out - {m}
    return graph


def main() -> None:
    graph = import_graph(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())

    @cache
    def floor(m: str) -> int:
        return 1 + max((floor(d) for d in graph[m]), default=0)

    flat = [m for m in graph if m.count(".") == 1]
    print(f"modules {len(graph)}, imports {sum(map(len, graph.values()))},"
          f" floors {max(map(floor, graph))}, flat core {len(flat)}")  # fmt: skip


if __name__ == "__main__":
    main()
