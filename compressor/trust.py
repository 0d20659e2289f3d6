"""What `compress` trusts in a folder it did not make itself (a zoo entry, a run directory someone
else made, a model directory): every path stays inside its folder, no link is followed out of it,
and no code from it runs unless the user says so (`--trust-remote-code`). docs/security.md is the
threat model.

Pure functions of a directory; nothing here writes.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from compressor.errors import UntrustedInput
from compressor.rundir import ST_MODULES_FILE

TRUST_FLAG = "--trust-remote-code"
# files Python (or a loader beside it) can import or execute
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".pth")
ST_PACKAGE = "sentence_transformers."  # module types of sentence-transformers' own modules


# ---------------------------------------------------------------------------- paths


def inside(base: Path, rel: object, what: str) -> Path:
    """`base / rel` for a relative posix path `rel` read from `what` (a manifest, modules.json):
    refused (UntrustedInput naming `what` and the path) unless it is a non-empty relative path
    without '..' or empty components that stays inside `base` with no symbolic link on the way."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise UntrustedInput(f"{what}: path {rel!r} is not a relative path; refused")
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UntrustedInput(
            f"{what}: path {rel!r} leaves its folder (absolute, '..' or an empty component);"
            " refused, nothing written"
        )
    base = Path(base)
    path = base.joinpath(*parts)
    link = first_link(base, PurePosixPath(rel))
    if link is not None:
        raise UntrustedInput(
            f"{what}: {link} is a symbolic link; links are not followed out of"
            f" {base}; refused, nothing written"
        )
    if not path.resolve().is_relative_to(base.resolve()):
        raise UntrustedInput(f"{what}: path {rel!r} resolves outside {base}; refused")
    return path


def first_link(base: Path, rel: PurePosixPath) -> str | None:
    """The first component of `base / rel` (from `base` down) that is a symbolic link, or None."""
    path = Path(base)
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            return str(path)
    return None


def links_under(root: Path) -> list[str]:
    """Every symbolic link under `root` (not followed), as paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_symlink())


def read_text_inside(base: Path, rel: str, what: str | None = None) -> str | None:
    """The text of `base / rel`, None when absent; refused when it is a link or leaves `base`."""
    path = inside(base, rel, what or str(Path(base) / rel))
    return path.read_text() if path.is_file() else None


# ---------------------------------------------------------------------------- code


def custom_modules(model_dir: Path) -> list[str]:
    """The module types in `model_dir/modules.json` that are not sentence-transformers' own (a
    custom module is imported, and its code runs, when the model loads)."""
    path = Path(model_dir) / ST_MODULES_FILE
    if not path.is_file() or path.is_symlink():
        return []
    try:
        modules = json.loads(path.read_text())
        types = [m["type"] for m in modules]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UntrustedInput(f"{path}: unreadable modules.json ({err})") from err
    return [t if isinstance(t, str) else repr(t) for t in types if not _st_type(t)]


def _st_type(kind: object) -> bool:
    return isinstance(kind, str) and kind.startswith(ST_PACKAGE) and kind.isascii()


def is_code_file(rel: str) -> bool:
    return Path(rel).suffix.lower() in CODE_SUFFIXES


def code_files(root: Path) -> list[str]:
    """Files under `root` that Python can import or execute (relative posix paths), and folders
    that are packages (hold __init__.py: listed by that file)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if is_code_file(p.name) and (p.is_file() or p.is_symlink())
    )


def code_in(d: Path, model_dirs: tuple[str, ...] = ("",)) -> list[str]:
    """What in `d` would run as code: importable files anywhere under it and the custom
    sentence-transformers modules of each of `model_dirs` (relative to `d`). One line each."""
    d = Path(d)
    lines = [f"{f}: importable code" for f in code_files(d)]
    for sub in model_dirs:
        model = d / sub if sub else d
        lines += [
            f"{(Path(sub) / ST_MODULES_FILE).as_posix()}: custom module {t!r}"
            " (its code runs when the model loads)"
            for t in custom_modules(model)
        ]
    return lines


def require_no_code(d: Path, trust: bool, what: str, model_dirs: tuple[str, ...] = ("",)) -> None:
    """Refuse `d` when it holds code that would run (custom modules, importable files), unless the
    user passed TRUST_FLAG."""
    if trust:
        return
    found = code_in(d, model_dirs)
    if found:
        raise UntrustedInput(
            f"{d}: holds code that would run on this machine when {what}:\n  "
            + "\n  ".join(found[:10])
            + (f"\n  ... and {len(found) - 10} more" if len(found) > 10 else "")
            + f"\nnot loaded; if you trust its author, run again with {TRUST_FLAG}"
        )


# ---------------------------------------------------------------------------- terminals


def printable(text: object) -> str:
    """`text` safe for a terminal: control characters (ESC, newlines, bidi overrides...) shown
    escaped, so text from an entry cannot move the cursor, forge a row or colour the screen."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in s)


def printable_tree(value: object) -> object:
    """`value` (JSON-like) with every string, keys included, passed through `printable`."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_tree(k): printable_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable_tree(v) for v in value]
    return value
