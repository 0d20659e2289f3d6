"""One zoo entry on disk: its id, the run files it holds, their hashes, and the index row derived
from it. Functions of a directory; nothing here touches the index.

The row is derived from the entry alone (manifest.json, summary.json, benchmark.json,
metrics.json), so a lost index can be rebuilt identically from the entry directories.

The id binds the content: its last segment hashes every file's sha256 as registered (all files
but the model card and the manifest). The only sanctioned change afterwards, recording an
evaluation, rewrites the evaluations file, so the manifest keeps that file's registration sha256
under REGISTERED_KEY. `id_problems` recomputes the hash from the manifest: a manifest re-signed
after a file changed no longer matches its own id, whatever an index says.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from compressor.deploy.bench import fp32_speedup
from compressor.errors import ZooError
from compressor.rundir import (
    BENCH_FILE,
    CARD_FILE,
    MANIFEST_FILE,
    ONNX_MODEL,
    SUMMARY_FILE,
    evals_path,
    read_json,
)
from compressor.shapes import Shape

METHOD = "homodistil"

SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
ID_PATTERN = re.compile(rf"{SEGMENT}(?:/{SEGMENT})*")
ID_SEGMENTS = 4  # teacher / method / shape / content hash
REGISTERED_KEY = "registered_sha256"  # manifest: {path: sha256 at registration} of changed files


def check_id(text: str) -> str:
    """An id (or id prefix) as typed: segments of [A-Za-z0-9._-], none empty, none starting with
    a dot, no '..', not absolute. Anything else is refused before it touches a path."""
    if not ID_PATTERN.fullmatch(text or "") or ".." in text or text.count("/") >= ID_SEGMENTS:
        raise ZooError(
            f"invalid zoo id {text!r}: expected segments of letters, digits, '.', '_', '-'"
            " separated by '/', e.g. bert-base-uncased/homodistil/6L-384H-12A-1536I/0123abcdef"
        )
    return text


def sanitize(name: str) -> str:
    """A teacher name as one id segment: 'org/model' -> 'org--model'."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip("-._")
    return clean[:128] or "model"


def make_id(teacher: str, student_shape: dict[str, int], files: dict[str, dict]) -> str:
    return f"{sanitize(teacher)}/{METHOD}/{Shape(**student_shape).label()}/{content_hash(files)}"


def content_hash(files: dict[str, dict]) -> str:
    """10 hex digits of the hash of every file's path and sha256: same run, same id."""
    listing = json.dumps({p: f["sha256"] for p, f in files.items()}, sort_keys=True)
    return hashlib.sha256(listing.encode()).hexdigest()[:10]


def id_listing(manifest: dict[str, Any]) -> dict[str, dict]:
    """The files the id's content hash was computed from, as the manifest says they were at
    registration: every file but the model card, with REGISTERED_KEY's sha256 where present."""
    registered = manifest.get(REGISTERED_KEY) or {}
    return {
        path: {"sha256": registered.get(path, f["sha256"])}
        for path, f in manifest["files"].items()
        if path != CARD_FILE
    }


def id_problems(entry_dir: Path, entry_id: str, manifest: dict[str, Any]) -> list[str]:
    """[] when the manifest's files hash to the id's content hash. An entry registered before
    REGISTERED_KEY existed that has since recorded evaluations cannot be checked this way (its
    trust rests on the checksums the index recorded): [] as well."""
    try:
        listing = id_listing(manifest)
    except (KeyError, TypeError, AttributeError):
        return [f"{MANIFEST_FILE}: malformed (no file table)"]
    if content_hash(listing) == entry_id.rsplit("/", 1)[-1]:
        return []
    try:
        evaluations = read_json(evals_path(entry_dir), {"evaluations": []}).get("evaluations")
    except (OSError, ValueError, AttributeError):
        evaluations = None
    if REGISTERED_KEY not in manifest and evaluations:
        return []
    return [
        f"{MANIFEST_FILE}: its files do not hash to the id (changed and re-signed after"
        " registration); do not trust this entry"
    ]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "bytes"}} of every regular file under `root` except the
    manifest itself, sorted by path. Links are listed with a None hash (never followed)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_symlink() or not p.is_dir()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_FILE:
            continue
        if path.is_symlink() or not path.is_file():
            out[rel] = {"sha256": None, "bytes": None}
        else:
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root to disk (before the rename that publishes it)."""
    for path in [*sorted(root.rglob("*")), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def headline_quality(evaluations: list[dict], summary: dict) -> tuple[str, float | None]:
    """The latest evaluation ('wiki_topics accuracy 0.812 (teacher 0.853)'), else the shipped
    model's similarity agreement with its teacher on held-out text, else the final held-out
    discrepancy."""
    if evaluations:
        e = evaluations[-1]
        student, teacher = e["student"]["mean"], (e.get("teacher") or {}).get("mean")
        text = f"{e['task']} {e['metric']} {student:.3f}"
        return (text + (f" (teacher {teacher:.3f})" if teacher is not None else ""), student)
    similarity = (summary.get("quality") or {}).get("similarity_spearman")
    if similarity is not None:
        return (f"similarity to teacher {similarity:.3f} (Spearman)", similarity)
    final = summary.get("discrepancy", {}).get("final")
    return (f"discrepancy {final:.3g}" if final is not None else "", final)


def entry_row(entry_dir: Path) -> dict[str, Any]:
    """The index row of an entry, from its files alone."""
    manifest = read_json(entry_dir / MANIFEST_FILE)
    summary = read_json(entry_dir / SUMMARY_FILE)
    evaluations = read_json(evals_path(entry_dir), {"evaluations": []})["evaluations"]
    quality, value = headline_quality(evaluations, summary)
    files = manifest["files"]
    return {
        "id": manifest["id"],
        "teacher": summary["teacher"],
        "recipe": summary["recipe"],
        "shape": Shape(**summary["student_shape"]).label(),
        "teacher_shape": Shape(**summary["teacher_shape"]).label(),
        "params": summary["student_params"],
        "teacher_params": summary["teacher_params"],
        "size_bytes": files[ONNX_MODEL]["bytes"],
        "entry_bytes": sum(f["bytes"] or 0 for f in files.values()),
        "speedup": fp32_speedup(read_json(entry_dir / BENCH_FILE)),
        "quality": quality,
        "quality_value": value,
        "discrepancy": summary.get("discrepancy", {}).get("final"),
        "created": manifest["created"],
        "files": files,
        "summary": summary,
        "evaluations": evaluations,
    }
