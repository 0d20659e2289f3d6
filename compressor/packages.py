"""Locate an installed package's directory without importing it (no package code runs).

`importlib.util.find_spec("a.b")` imports `a` to read its `__path__`; here the top-level spec is
found by the path finders alone and each submodule is looked up in its parent's search locations.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path | None:
    """The directory of the installed package `name` (dotted names allowed), or None."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name: nothing is imported
        for depth in range(1, len(parts)):
            if spec is None or not spec.submodule_search_locations:
                return None
            full = ".".join(parts[: depth + 1])
            locations = list(spec.submodule_search_locations)
            spec = importlib.machinery.PathFinder.find_spec(full, locations)
    except (ImportError, ValueError, OSError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
