"""The local model zoo: every verified run's student as an immutable directory, plus an index.

    <root>/entries/<teacher>/homodistil/<shape>/<hash>/   one entry (files read-only)
    <root>/index.sqlite                                   one row per entry (zoo_index.py)
    <root>/.staging/<pid>-<uuid>/                         registrations in progress (ignored)

Registration copies the run into staging, hashes every file, writes the model card and the
manifest, fsyncs, then inside one `BEGIN IMMEDIATE` transaction inserts the row and renames the
directory into place. A registration killed before that leaves only staging junk, which the next
registration or `reindex` removes (once its process is gone). The manifest is the record of truth:
`verify` re-hashes every file against it and against the index, and `reindex` rebuilds the index
from the manifests alone.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from compressor.errors import CheckFailed, RunDirError, ZooError
from compressor.rundir import (
    BENCH_FILE,
    CARD_FILE,
    ENV_FILE,
    EVALS_FILE,
    EXPORT_REPORT,
    LEGACY_EVALS_FILE,
    MANIFEST_FILE,
    ONNX_DIR,
    ONNX_MODEL,
    OPTIONAL_RUN_FILES,
    RECIPE_FILE,
    RUN_FILES,
    SUMMARY_FILE,
    VERIFY_FILE,
    evals_path,
    read_json,
    write_json_atomic,
)
from compressor.zoo import index as zoo_index
from compressor.zoo.card import model_card
from compressor.zoo.entry import (
    ID_SEGMENTS,
    check_id,
    entry_row,
    file_table,
    fsync_tree,
    make_id,
    sha256_file,
)

ZOO_ENV, DEFAULT_ROOT = "COMPRESS_ZOO", "zoo"
ENTRIES, STAGING = "entries", ".staging"
BUNDLE_EXTRAS = (CARD_FILE, VERIFY_FILE, BENCH_FILE)


# ---------------------------------------------------------------------------- locations and ids


def zoo_root(flag: Path | str | None = None, recipe_dir: str | None = None) -> Path:
    """--zoo flag > $COMPRESS_ZOO > the recipe's zoo.dir > ./zoo."""
    return Path(flag or os.environ.get(ZOO_ENV) or recipe_dir or DEFAULT_ROOT)


def entry_dir(root: Path, entry_id: str) -> Path:
    """The directory of an id; refuses any id that would resolve outside the zoo."""
    base = (Path(root) / ENTRIES).resolve()
    path = (base / check_id(entry_id)).resolve()
    if not path.is_relative_to(base) or path == base:
        raise ZooError(f"invalid zoo id {entry_id!r}: it leaves the zoo directory")
    return path


def resolve(root: Path, text: str, exact: bool = False) -> str:
    """The full id of `text`: an exact id, or (unless `exact`) a unique id prefix or a unique
    short-hash prefix."""
    check_id(text)
    ids = _indexed_ids(Path(root))
    if text in ids:
        return text
    if exact:
        raise ZooError(f"no entry {text!r} in the zoo at {root} (give the full id to remove)")
    hits = [i for i in ids if i.startswith(text) or i.rsplit("/", 1)[-1].startswith(text)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ZooError(f"no entry {text!r} in the zoo at {root} (see `compress zoo list`)")
    raise ZooError(f"{text!r} matches {len(hits)} entries: " + ", ".join(hits[:5]))


def _indexed_ids(root: Path) -> list[str]:
    if not zoo_index.exists(root):
        _require_index(root)
        return []
    with zoo_index.reader(root) as conn:
        return zoo_index.all_ids(conn)


def _require_index(root: Path) -> None:
    if not zoo_index.exists(root) and _entry_dirs(root):
        raise ZooError(f"{root}: the index is missing; rebuild it with `compress zoo reindex`")


def _entry_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / ENTRIES).glob("/".join(["*"] * ID_SEGMENTS)) if p.is_dir())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------- staging


def _new_staging(root: Path) -> Path:
    path = root / STAGING / f"{os.getpid()}-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_staging(root: Path) -> list[str]:
    """Remove what dead processes left in staging; returns the names removed."""
    removed = []
    for path in sorted((root / STAGING).glob("*")):
        pid = path.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _seal(root: Path) -> None:
    """Entries are immutable: files read-only (directories stay writable for `rm`)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o444)


# ---------------------------------------------------------------------------- register


def check_registrable(run_dir: Path) -> None:
    missing = [n for n in RUN_FILES if not (run_dir / n).exists()]
    if missing or not (run_dir / ONNX_MODEL).exists():
        raise RunDirError(
            f"{run_dir}: not a finished, exported run (missing: {', '.join(missing or [ONNX_MODEL])})"
        )
    if read_json(run_dir / VERIFY_FILE).get("passed") is not True:
        raise CheckFailed(f"{run_dir}: ONNX verification did not pass; not registered")


def register(run_dir: Path, root: Path) -> str:
    """Register a finished, verified run; returns its id. Idempotent: the same run gives the same
    id, and registering it again returns the existing entry."""
    run_dir, root = Path(run_dir), Path(root)
    check_registrable(run_dir)
    clean_staging(root)
    staging = _new_staging(root)
    try:
        _copy_run(run_dir, staging)
        summary = read_json(staging / SUMMARY_FILE)
        entry_id = make_id(summary["teacher"], summary["student_shape"], file_table(staging))
        _finish_entry(staging, entry_id, _now(), str(run_dir.resolve()))
        fsync_tree(staging)
        _publish(root, staging, entry_id)
        return entry_id
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_run(run_dir: Path, staging: Path) -> None:
    for name in RUN_FILES + OPTIONAL_RUN_FILES:
        src = run_dir / name
        if src.is_dir():
            shutil.copytree(src, staging / name, copy_function=shutil.copyfile)
        elif src.is_file():
            shutil.copyfile(src, staging / name)
    if not evals_path(staging).exists():
        write_json_atomic(staging / EVALS_FILE, {"evaluations": []})


def _finish_entry(staging: Path, entry_id: str, created: str, source: str) -> None:
    """Model card, then the manifest of every file (card included); then seal."""
    (staging / CARD_FILE).write_text(_card(staging, entry_id, created))
    manifest = {
        "id": entry_id,
        "created": created,
        "source_run": source,
        "files": file_table(staging),
    }
    write_json_atomic(staging / MANIFEST_FILE, manifest)
    _seal(staging)


def _card(d: Path, entry_id: str, created: str) -> str:
    task = read_json(d / ONNX_DIR / EXPORT_REPORT, {}).get("task", "feature-extraction")
    evaluations = read_json(evals_path(d), {"evaluations": []})["evaluations"]
    return model_card(
        entry_id,
        read_json(d / SUMMARY_FILE),
        evaluations,
        read_json(d / BENCH_FILE),
        task,
        created,
    )


def _publish(root: Path, staging: Path, entry_id: str) -> None:
    """Insert the row and rename the entry into place in one transaction."""
    final, published = entry_dir(root, entry_id), False
    try:
        with zoo_index.write_transaction(root) as conn:
            if zoo_index.get(conn, entry_id) is not None:
                return  # already registered: idempotent
            if final.exists():  # renamed into place by a registration that died before commit
                zoo_index.insert(conn, entry_row(final))
                return
            zoo_index.insert(conn, entry_row(staging))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, final)
            published = True
    except BaseException:
        if published and final.exists():
            os.rename(final, staging)
        raise


# ---------------------------------------------------------------------------- read


def list_entries(root: Path) -> list[dict[str, Any]]:
    """Every entry's index row, oldest first; [] for an empty or missing zoo."""
    root = Path(root)
    _require_index(root)
    if not zoo_index.exists(root):
        return []
    with zoo_index.reader(root) as conn:
        return zoo_index.all_rows(conn)


def get_entry(root: Path, text: str) -> dict[str, Any]:
    entry_id = resolve(root, text)
    with zoo_index.reader(root) as conn:
        return zoo_index.get(conn, entry_id)


def show(root: Path, text: str) -> dict[str, Any]:
    """Everything about one entry: its row, the resolved recipe, benchmark, verification report,
    environment and its directory."""
    row = get_entry(root, text)
    d = entry_dir(root, row["id"])
    recipe = d / RECIPE_FILE
    return {
        **row,
        "dir": str(d),
        "recipe_resolved": yaml.safe_load(recipe.read_text()) if recipe.exists() else None,
        "benchmark": read_json(d / BENCH_FILE),
        "verify": read_json(d / VERIFY_FILE),
        "environment": read_json(d / ENV_FILE),
    }


def compare(root: Path, texts: list[str]) -> list[dict[str, Any]]:
    return [get_entry(root, t) for t in texts]


# ---------------------------------------------------------------------------- verify


def verify(root: Path, text: str) -> dict[str, Any]:
    """Re-hash every file against the manifest and the index, then re-run the stored ONNX check
    on the stored samples. Writes nothing."""
    row = get_entry(root, text)
    d = entry_dir(root, row["id"])
    problems = file_problems(d, row["id"], row["files"])
    onnx = onnx_check(d)
    if not onnx["passed"]:
        problems.append(f"ONNX check: {onnx['error']}")
    return {"id": row["id"], "passed": not problems, "problems": problems, "onnx": onnx}


def file_problems(d: Path, entry_id: str, recorded: dict[str, dict]) -> list[str]:
    """One line per missing, modified or extra file, and per disagreement with the manifest."""
    problems = []
    try:
        manifest = read_json(d / MANIFEST_FILE)
    except ValueError:
        manifest = {}
    if manifest is None:
        problems.append(f"{MANIFEST_FILE}: missing")
    elif manifest.get("id") != entry_id or manifest.get("files") != recorded:
        problems.append(f"{MANIFEST_FILE}: disagrees with the index")
    actual = file_table(d) if d.is_dir() else {}
    for path, want in recorded.items():
        got = actual.get(path)
        if got is None:
            problems.append(f"{path}: missing")
        elif got["sha256"] != want["sha256"]:
            problems.append(
                f"{path}: modified (sha256 {str(got['sha256'])[:12]}..., recorded {want['sha256'][:12]}...)"
            )
    problems += [f"{p}: not in the manifest (extra file)" for p in actual if p not in recorded]
    return problems


def onnx_check(d: Path) -> dict[str, Any]:
    """The stored ONNX verification, re-run on the stored samples with the entry's tolerances."""
    from compressor.deploy.stages import verify_again

    if not (d / ONNX_MODEL).exists():
        return {"passed": False, "error": f"{ONNX_MODEL} is missing"}
    try:
        return {"passed": True, "models": verify_again(d, write=False)}
    except CheckFailed as err:
        return {"passed": False, "error": str(err)}
    except Exception as err:  # a corrupt file can fail anywhere in onnxruntime: report, not crash
        return {"passed": False, "error": f"could not run: {type(err).__name__}: {err}"}


def verify_zoo(root: Path, entry_id: str | None) -> dict[str, Any]:
    """Verify one entry, or (`entry_id` None) every entry plus the index itself and the entry
    directories it does not list. Writes nothing."""
    ids = [entry_id] if entry_id is not None else [r["id"] for r in list_entries(root)]
    reports = [verify(root, i) for i in ids]
    zoo_problems = []
    if entry_id is None:
        integrity = index_integrity(root)
        zoo_problems += [] if integrity == "ok" else [f"index.sqlite: {integrity}"]
        zoo_problems += [
            f"{u}: an entry directory the index does not list (run reindex)"
            for u in unindexed_dirs(root)
        ]
    passed = all(r["passed"] for r in reports) and not zoo_problems
    return {"passed": passed, "entries": reports, "zoo_problems": zoo_problems}


def index_integrity(root: Path) -> str:
    """SQLite's own check of the index file ('ok' when sound)."""
    if not zoo_index.exists(root):
        return "ok"
    with zoo_index.reader(root) as conn:
        return zoo_index.integrity(conn)


def unindexed_dirs(root: Path) -> list[str]:
    """Entry directories on disk that the index does not list."""
    ids = set(_indexed_ids(root))
    return [
        p.relative_to(root / ENTRIES).as_posix()
        for p in _entry_dirs(root)
        if p.relative_to(root / ENTRIES).as_posix() not in ids
    ]


# ---------------------------------------------------------------------------- write


def remove(root: Path, text: str) -> str:
    """Delete an entry and its row (the directory leaves the entries tree inside the transaction)."""
    root = Path(root)
    entry_id = resolve(root, text, exact=True)
    d, moved = entry_dir(root, entry_id), False
    trash = root / STAGING / f"{os.getpid()}-rm-{uuid.uuid4().hex}"
    try:
        with zoo_index.write_transaction(root) as conn:
            zoo_index.delete(conn, entry_id)
            if d.exists():
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.rename(d, trash)
                moved = True
                _prune_empty_parents(d, root / ENTRIES)
    except BaseException:
        if moved:
            d.parent.mkdir(parents=True, exist_ok=True)
            os.rename(trash, d)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    return entry_id


def _prune_empty_parents(path: Path, stop: Path) -> None:
    for parent in path.parents:
        if parent in (stop, stop.resolve()):
            break
        try:
            parent.rmdir()
        except OSError:
            break


def export_bundle(root: Path, text: str, dest: Path) -> Path:
    """Copy the deployable bundle (onnx/ contents, model card, verify.json, benchmark.json) to a
    new or empty DEST, checking every copied file against its recorded sha256."""
    row, dest = get_entry(root, text), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ZooError(f"{dest}: exists and is not empty; give a new or empty directory")
    recorded = row["files"]
    plan = {p.removeprefix("onnx/"): p for p in recorded if p.startswith("onnx/")}
    plan |= {p: p for p in BUNDLE_EXTRAS if p in recorded}
    src = entry_dir(root, row["id"])
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for name, rel in plan.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            if not (src / rel).is_file():
                raise CheckFailed(f"{rel}: missing from entry {row['id']}; not exported")
            shutil.copyfile(src / rel, tmp / name)
            if sha256_file(tmp / name) != recorded[rel]["sha256"]:
                raise CheckFailed(
                    f"{rel}: modified since registration; not exported (compress zoo verify {row['id']})"
                )
        write_json_atomic(tmp / MANIFEST_FILE, {"id": row["id"], "files": file_table(tmp)})
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def record_evaluation(root: Path, entry_id: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Append an evaluation to the entry's metrics.json (and its model card), updating the
    manifest and the index row in one transaction. The only sanctioned change to an entry."""
    missing = [k for k in ("task", "metric", "student") if k not in evaluation]
    if missing or "mean" not in evaluation.get("student", {}):
        raise ZooError(f"evaluation: needs task, metric and student.mean (missing {missing})")
    root = Path(root)
    entry_id = resolve(root, entry_id)
    d = entry_dir(root, entry_id)
    evals = evals_path(d).name  # entries registered before 0.2 keep their metrics.json
    with zoo_index.write_transaction(root) as conn:
        row = zoo_index.get(conn, entry_id)
        stale = [
            p
            for p in file_problems(d, entry_id, row["files"])
            if p.startswith((EVALS_FILE, LEGACY_EVALS_FILE, CARD_FILE, MANIFEST_FILE))
        ]
        if stale:
            raise CheckFailed(f"{entry_id}: not recording an evaluation: " + "; ".join(stale))
        evaluations = read_json(d / evals)["evaluations"]
        evaluations.append({**evaluation, "created": evaluation.get("created") or _now()})
        manifest = read_json(d / MANIFEST_FILE)
        write_json_atomic(d / evals, {"evaluations": evaluations})
        card_tmp = d / f".{CARD_FILE}.tmp-{os.getpid()}"
        card_tmp.write_text(_card(d, entry_id, manifest["created"]))
        os.replace(card_tmp, d / CARD_FILE)
        for rel in (evals, CARD_FILE):
            (d / rel).chmod(0o444)
            manifest["files"][rel] = {
                "sha256": sha256_file(d / rel),
                "bytes": (d / rel).stat().st_size,
            }
        write_json_atomic(d / MANIFEST_FILE, manifest)
        (d / MANIFEST_FILE).chmod(0o444)
        new_row = entry_row(d)
        zoo_index.replace(conn, new_row)
    return new_row


def reindex(root: Path) -> dict[str, Any]:
    """Rebuild the index from the entry directories' manifests (staging is ignored and cleaned)."""
    root = Path(root)
    cleaned = clean_staging(root)
    rows, skipped = [], []
    for d in _entry_dirs(root):
        rel = d.relative_to(root / ENTRIES).as_posix()
        try:
            row = entry_row(d)
        except (OSError, ValueError, KeyError, TypeError) as err:
            skipped.append(f"{rel}: unreadable entry ({type(err).__name__}: {err})")
            continue
        if row["id"] != rel:
            skipped.append(f"{rel}: its manifest names another id ({row['id']})")
            continue
        rows.append(row)
    with zoo_index.write_transaction(root) as conn:
        zoo_index.delete_all(conn)
        for row in rows:
            zoo_index.insert(conn, row)
    return {"entries": len(rows), "skipped": skipped, "staging_removed": cleaned}
