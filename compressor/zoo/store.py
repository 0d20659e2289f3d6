"""The local model zoo: every verified run's student as an immutable directory, plus an index.

    <root>/entries/<teacher>/homodistil/<shape>/<hash>/   one entry (files read-only)
    <root>/index.sqlite                                   one row per entry (zoo_index.py)
    <root>/.staging/<pid>-<uuid>/                         registrations in progress (ignored)

Registration copies the run into staging, hashes every file, writes the model card and the
manifest, fsyncs, then inside one `BEGIN IMMEDIATE` transaction inserts the row and renames the
directory into place. A registration killed before that leaves only staging junk, which the next
registration or `reindex` removes (once its process is gone). The manifest is the record of truth:
`verify` re-hashes every file against it and against the index, and `reindex` rebuilds the index
from the manifests.

Trust. Two anchors outside a manifest say what an entry held when it was registered: the file
checksums the index recorded then (changed only by `record_evaluation`), and the id itself, whose
content hash covers every file (entry.id_problems). `verify` checks both, so a file modified and
its manifest re-signed fails. `reindex` never moves trust: an entry the index already knows whose
manifest now disagrees keeps its recorded row (and `verify` keeps failing it); an entry the index
does not know (a lost or damaged index) is indexed from its manifest, and `verify` judges it by
its id. Reindexing alone therefore never turns a failing entry into a passing one.

Faults. A damaged or missing index is refused with one message (`compress zoo reindex` rebuilds
it; a damaged file is moved aside, never read again). A missing index is never replaced by an
empty one while entry directories exist. Disk full or any OS error during registration, export,
an evaluation record or reindex is one ZooError; temporary files are removed and the entries that
were there stay as they were.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from compressor.deploy.signature import onnx_signature
from compressor.errors import CheckFailed, RunDirError, UntrustedInput, ZooError
from compressor.run_files import check_run_files
from compressor.rundir import (
    BENCH_FILE,
    CARD_FILE,
    ENV_FILE,
    EVALS_FILE,
    EXPORT_REPORT,
    MANIFEST_FILE,
    MODEL_DIR,
    ONNX_DIR,
    ONNX_MODEL,
    OPTIONAL_RUN_FILES,
    RECIPE_FILE,
    RUN_FILES,
    SENTENCE_ONNX,
    ST_MODULES_FILE,
    SUMMARY_FILE,
    VERIFY_FILE,
    evals_path,
    read_json,
    write_json_atomic,
)
from compressor.trust import (
    TRUST_FLAG,
    code_in,
    custom_modules,
    first_link,
    inside,
    is_code_file,
    links_under,
    read_text_inside,
    require_no_code,
)
from compressor.zoo import index as zoo_index
from compressor.zoo.card import model_card
from compressor.zoo.entry import (
    ID_SEGMENTS,
    REGISTERED_KEY,
    check_id,
    entry_row,
    file_table,
    fsync_tree,
    id_problems,
    make_id,
    sha256_file,
)

ZOO_ENV, DEFAULT_ROOT = "COMPRESS_ZOO", "zoo"
ENTRIES, STAGING = "entries", ".staging"
BUNDLE_EXTRAS = (CARD_FILE, VERIFY_FILE, BENCH_FILE)
BUNDLE_FORMATS = ("onnx", "sentence-transformers")
ONNX_KEY = "onnx"  # manifest: {path: opset and io ports} of every ONNX file (deploy/signature.py)


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
    """A missing index is an empty zoo only when there are no entry directories either."""
    if not zoo_index.exists(root) and _entry_dirs(root):
        raise ZooError(
            f"{zoo_index.path_of(root)}: the zoo index is missing but {root / ENTRIES} holds"
            " entries; rebuild it with `compress zoo reindex`"
        )


def _ensure_index(root: Path) -> None:
    """Create the (empty) index of a new zoo; refused where entries exist without one."""
    if not zoo_index.exists(root):
        _require_index(root)
        zoo_index.create(root, [])


def fault_text(err: BaseException) -> str:
    """One line for an OS error (shutil.Error's list of failures included)."""
    if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list):
        src, _, why = err.args[0][0]  # copytree keeps only the text of each failure
        if os.strerror(errno.ENOSPC) in why:
            return f"the disk is full (copying {src}); free some space and try again"
        return f"{why} (copying {src})"
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return f"the disk is full{where}; free some space and try again"
    return str(err)


def _entry_dirs(root: Path) -> list[Path]:
    """Entry folders on disk (a link is never one: it could point anywhere on this machine)."""
    base = root / ENTRIES
    return sorted(
        p
        for p in base.glob("/".join(["*"] * ID_SEGMENTS))
        if p.is_dir() and first_link(base, PurePosixPath(p.relative_to(base).as_posix())) is None
    )


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


def check_registrable(run_dir: Path, trust_remote_code: bool = False) -> None:
    """A finished, exported, verified run with well-typed files, no link (the entry would copy
    what it points at) and, unless `trust_remote_code`, no code that would run where it loads."""
    missing = [n for n in RUN_FILES if not (run_dir / n).exists()]
    if missing or not (run_dir / ONNX_MODEL).exists():
        raise RunDirError(
            f"{run_dir}: not a finished, exported run (missing: {', '.join(missing or [ONNX_MODEL])})"
        )
    links = [n for n in RUN_FILES + OPTIONAL_RUN_FILES if (run_dir / n).is_symlink()]
    links += [
        f"{n}/{rel}" for n in (MODEL_DIR, ONNX_DIR) if (run_dir / n).is_dir()
        for rel in links_under(run_dir / n)
    ]  # fmt: skip
    if links:
        raise UntrustedInput(
            f"{run_dir}: {', '.join(links[:5])}: a symbolic link; the zoo copies files, never"
            " what a link points at (replace it with the file itself); not registered"
        )
    check_run_files(run_dir)
    require_no_code(run_dir, trust_remote_code, "the model is registered and loaded", (MODEL_DIR,))
    if read_json(run_dir / VERIFY_FILE).get("passed") is not True:
        raise CheckFailed(f"{run_dir}: ONNX verification did not pass; not registered")


def register(run_dir: Path, root: Path, trust_remote_code: bool = False) -> str:
    """Register a finished, verified run; returns its id. Idempotent: the same run gives the same
    id, and registering it again returns the existing entry. A run holding code is refused
    unless `trust_remote_code` (docs/security.md)."""
    run_dir, root = Path(run_dir), Path(root)
    check_registrable(run_dir, trust_remote_code)
    staging = None
    try:
        clean_staging(root)
        _ensure_index(root)
        staging = _new_staging(root)
        _copy_run(run_dir, staging)
        summary = read_json(staging / SUMMARY_FILE)
        entry_id = make_id(summary["teacher"], summary["student_shape"], file_table(staging))
        _finish_entry(staging, entry_id, _now(), str(run_dir.resolve()))
        fsync_tree(staging)
        _publish(root, staging, entry_id)
        return entry_id
    except (OSError, ZooError) as err:
        text = str(err) if isinstance(err, ZooError) else fault_text(err)
        raise ZooError(
            f"could not register {run_dir} in the zoo at {root}: {text}\n"
            f"the run directory is finished and unchanged; once that is fixed, register it with:"
            f" compress zoo add {run_dir}"
        ) from err
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _copy_run(run_dir: Path, staging: Path) -> None:
    for name in RUN_FILES + OPTIONAL_RUN_FILES:
        src = run_dir / name
        if src.is_dir():
            shutil.copytree(src, staging / name, symlinks=True, copy_function=shutil.copyfile)
        elif src.is_file():
            shutil.copyfile(src, staging / name)
    if not evals_path(staging).exists():
        write_json_atomic(staging / EVALS_FILE, {"evaluations": []})


def _finish_entry(staging: Path, entry_id: str, created: str, source: str) -> None:
    """Model card, then the manifest of every file (card included) with the evaluations file's
    sha256 as registered (REGISTERED_KEY: what the id hashes); then seal."""
    evaluations = read_json(evals_path(staging))["evaluations"]
    (staging / CARD_FILE).write_text(_card(staging, entry_id, created, evaluations))
    files = file_table(staging)
    evals = evals_path(staging).name
    manifest = {
        "id": entry_id,
        "created": created,
        "source_run": source,
        "files": files,
        REGISTERED_KEY: {evals: files[evals]["sha256"]},
        ONNX_KEY: onnx_signatures(staging, files),
    }
    write_json_atomic(staging / MANIFEST_FILE, manifest)
    _seal(staging)


def onnx_signatures(d: Path, files: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """{path: opset and inputs/outputs} of every ONNX file listed in `files` (as the ONNX Model
    Hub's manifest records them)."""
    return {rel: onnx_signature(d / rel) for rel in files if rel.endswith(".onnx")}


def _card(d: Path, entry_id: str, created: str, evaluations: list[dict]) -> str:
    task = read_json(d / ONNX_DIR / EXPORT_REPORT, {}).get("task", "feature-extraction")
    return model_card(
        entry_id,
        read_json(d / SUMMARY_FILE),
        evaluations,
        read_json(d / BENCH_FILE),
        task,
        created,
        sentence_encoder=(d / MODEL_DIR / ST_MODULES_FILE).is_file(),
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
    try:
        recipe = read_text_inside(d, RECIPE_FILE)
        return {
            **row,
            "dir": str(d),
            "recipe_resolved": yaml.safe_load(recipe) if recipe is not None else None,
            "benchmark": _entry_json(d, BENCH_FILE),
            "verify": _entry_json(d, VERIFY_FILE),
            "environment": _entry_json(d, ENV_FILE),
        }
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ZooError(
            f"{row['id']}: unreadable entry ({type(err).__name__}: {err}); check it with"
            f" `compress zoo verify {row['id']}`"
        ) from err


def _entry_json(d: Path, name: str) -> Any:
    """A JSON file of an entry (None when absent), read only from inside it, never via a link."""
    text = read_text_inside(d, name)
    return json.loads(text) if text is not None else None


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
    try:
        code = code_in(d, (MODEL_DIR,))
    except UntrustedInput as err:
        code = [str(err)]
    return {"id": row["id"], "passed": not problems, "problems": problems, "onnx": onnx,
            "code": code}  # fmt: skip


def file_problems(d: Path, entry_id: str, recorded: dict[str, dict]) -> list[str]:
    """One line per missing, modified or extra file, per disagreement with the manifest, and when
    the manifest's files do not hash to the id. An entry directory that vanishes meanwhile (a
    concurrent `rm`) is reported, not raised."""
    if not d.is_dir():
        return [f"{d}: the entry directory is missing (removed?)"]
    problems = []
    try:
        manifest = read_json(d / MANIFEST_FILE)
    except (ValueError, FileNotFoundError):
        manifest = {}
    if manifest is None:
        problems.append(f"{MANIFEST_FILE}: missing")
    elif not isinstance(manifest, dict):
        problems.append(f"{MANIFEST_FILE}: malformed")
    else:
        if manifest.get("id") != entry_id or manifest.get("files") != recorded:
            problems.append(f"{MANIFEST_FILE}: disagrees with the index")
        if manifest:
            problems += id_problems(d, entry_id, manifest)
    try:
        actual = file_table(d)
    except FileNotFoundError:
        return [f"{d}: the entry directory vanished while being checked (removed?)"]
    for path in recorded:
        try:
            inside(d, path, MANIFEST_FILE)
        except UntrustedInput as err:
            problems.append(str(err))
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
    if entry_id is not None:
        reports = [verify(root, entry_id)]
    else:
        reports = [_verify_listed(root, r["id"]) for r in list_entries(root)]
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


def _verify_listed(root: Path, entry_id: str) -> dict[str, Any]:
    """`verify` of an entry listed a moment ago: one removed since (a concurrent `rm`) is
    reported as removed, not as a failure, and never as a traceback."""
    try:
        report = verify(root, entry_id)
    except ZooError:
        if entry_id in _indexed_ids(root):
            raise
        report = {"id": entry_id, "passed": False, "problems": [], "onnx": {}}
    if not report["passed"] and entry_id not in _indexed_ids(root):
        return {"id": entry_id, "passed": True, "removed": True, "problems": [], "onnx": {}}
    return report


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


def export_bundle(
    root: Path, text: str, dest: Path, layout: str = "onnx", trust_remote_code: bool = False
) -> tuple[Path, list[str]]:
    """Copy a deployable bundle to a new or empty DEST, checking every copied file against its
    recorded sha256, with a manifest of the files and of each ONNX file's opset and io ports.
    Returns DEST and the files left out (code, unless `trust_remote_code`).

    `onnx`: the onnx/ contents (loads with ORTModelForFeatureExtraction / ORTModelForMaskedLM);
    `sentence-transformers`: the model/ contents of a sentence encoder, whose onnx/model.onnx is
    the pooled graph (loads with SentenceTransformer(DEST) and SentenceTransformer(DEST,
    backend="onnx")). Both add the model card, verify.json and benchmark.json.

    The entry is untrusted input: every manifest path must stay inside the entry (and its bundle
    name inside DEST) with no link on the way, or nothing is written. Code (importable files,
    custom sentence-transformers modules) is not shipped unless `trust_remote_code`."""
    if layout not in BUNDLE_FORMATS:
        raise ZooError(f"unknown bundle format {layout!r}; one of {', '.join(BUNDLE_FORMATS)}")
    row, dest = get_entry(root, text), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ZooError(f"{dest}: exists and is not empty; give a new or empty directory")
    recorded = row["files"]
    src = entry_dir(root, row["id"])
    what = f"entry {row['id']}, {MANIFEST_FILE}"
    for rel in recorded:
        inside(src, rel, what)
    if layout == "sentence-transformers":
        if SENTENCE_ONNX not in recorded:
            raise ZooError(
                f"{row['id']}: has no sentence-transformers graph ({SENTENCE_ONNX}): its teacher"
                " is not a sentence encoder, or it was exported before the graph existed"
                " (re-export the run with `compress export --onnx RUN_DIR`, then register it);"
                f" `compress zoo export {row['id']} DEST` writes the ONNX bundle"
            )
        custom = custom_modules(src / MODEL_DIR)
        if custom and not trust_remote_code:
            raise UntrustedInput(
                f"{row['id']}: its sentence-transformers modules include custom code"
                f" ({', '.join(map(repr, custom))}) that would run wherever the bundle loads;"
                f" not exported (if you trust its author: {TRUST_FLAG})"
            )
        prefix = f"{MODEL_DIR}/"
    else:
        prefix = f"{ONNX_DIR}/"
    plan = {p.removeprefix(prefix): p for p in recorded if p.startswith(prefix)}
    plan |= {p: p for p in BUNDLE_EXTRAS if p in recorded}
    left_out = [] if trust_remote_code else sorted(r for r in plan.values() if is_code_file(r))
    plan = {name: rel for name, rel in plan.items() if rel not in left_out}
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for name in plan:
        inside(tmp, name, what)
    try:
        for name, rel in plan.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            if not (src / rel).is_file():
                raise CheckFailed(f"{rel}: missing from entry {row['id']}; not exported")
            shutil.copyfile(inside(src, rel, what), tmp / name, follow_symlinks=False)
            if sha256_file(tmp / name) != recorded[rel]["sha256"]:
                raise CheckFailed(
                    f"{rel}: modified since registration; not exported (compress zoo verify {row['id']})"
                )
        files = file_table(tmp)
        write_json_atomic(
            tmp / MANIFEST_FILE,
            {"id": row["id"], "files": files, ONNX_KEY: onnx_signatures(tmp, files)},
        )
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except OSError as err:
        raise ZooError(
            f"could not export {row['id']} to {dest}: {fault_text(err)}; nothing was written there"
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest, left_out


def record_evaluation(root: Path, entry_id: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Append an evaluation to the entry's evaluations file (and its model card), updating the
    manifest and the index row in one transaction. The only sanctioned change to an entry, and
    only to an entry that verifies (every file, the manifest and the id).

    All or nothing: the three new files are written and fsynced in staging first, then renamed
    over the old ones (the manifest last) after hard-linking the old ones into staging; any
    failure, up to and including the commit of the index row, puts every replaced file back and
    rolls the index back, so the entry verifies as before."""
    missing = [k for k in ("task", "metric", "student") if k not in evaluation]
    if missing or "mean" not in evaluation.get("student", {}):
        raise ZooError(f"evaluation: needs task, metric and student.mean (missing {missing})")
    root = Path(root)
    entry_id = resolve(root, entry_id)
    d = entry_dir(root, entry_id)
    staging, replaced = None, []
    try:
        with zoo_index.write_transaction(root) as conn:
            _refuse_unverified(root, entry_id, zoo_index.get(conn, entry_id))
            staging = _new_staging(root)
            new = _staged_evaluation(d, entry_id, evaluation, staging)
            _swap_in(d, new, staging, replaced)
            new_row = entry_row(d)
            zoo_index.replace(conn, new_row)
    except BaseException as err:
        _put_back(d, replaced, staging)
        if isinstance(err, OSError):
            raise ZooError(
                f"could not record the evaluation in {entry_id}: {fault_text(err)}; the entry"
                " is unchanged"
            ) from err
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return new_row


def check_recordable(root: Path, entry_id: str) -> None:
    """Raise CheckFailed unless every file of the entry matches its manifest, the index and
    its id (`record_evaluation` checks again inside its transaction)."""
    _refuse_unverified(root, entry_id, get_entry(root, entry_id))


def _refuse_unverified(root: Path, entry_id: str, row: dict[str, Any] | None) -> None:
    if row is None:
        raise ZooError(f"no entry {entry_id!r} in the zoo at {root} (removed meanwhile)")
    problems = file_problems(entry_dir(root, entry_id), entry_id, row["files"])
    if problems:
        raise CheckFailed(
            f"{entry_id}: does not verify; not recording an evaluation"
            f" (see `compress zoo verify {entry_id}`):\n  " + "\n  ".join(problems)
        )


def _staged_evaluation(
    d: Path, entry_id: str, evaluation: dict[str, Any], staging: Path
) -> dict[str, Path]:
    """The entry's evaluations file, model card and manifest with `evaluation` appended, written
    (sealed, fsynced) under `staging`: {name in the entry: staged file}, the manifest last."""
    evals = evals_path(d).name  # entries registered before 0.2 keep their metrics.json
    manifest = read_json(d / MANIFEST_FILE)
    if REGISTERED_KEY not in manifest and not id_problems(d, entry_id, manifest):
        # registered before the key existed, evaluations untouched: this is the registered state
        manifest[REGISTERED_KEY] = {evals: manifest["files"][evals]["sha256"]}
    evaluations = read_json(d / evals)["evaluations"]
    evaluations.append({**evaluation, "created": evaluation.get("created") or _now()})
    new = {evals: staging / evals, CARD_FILE: staging / CARD_FILE}
    write_json_atomic(new[evals], {"evaluations": evaluations})
    new[CARD_FILE].write_text(_card(d, entry_id, manifest["created"], evaluations))
    for rel, path in new.items():
        manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    new[MANIFEST_FILE] = staging / MANIFEST_FILE
    write_json_atomic(new[MANIFEST_FILE], manifest)
    for path in new.values():
        path.chmod(0o444)
    fsync_tree(staging)
    return new


def _swap_in(d: Path, new: dict[str, Path], staging: Path, replaced: list[str]) -> None:
    """Rename each staged file over its namesake in `d`, in order, each old one hard-linked into
    `staging/old/` first; `replaced` grows as they go (for `_put_back`)."""
    (staging / "old").mkdir()
    for rel, path in new.items():
        os.link(d / rel, staging / "old" / rel)
        os.replace(path, d / rel)
        replaced.append(rel)


def _put_back(d: Path, replaced: list[str], staging: Path | None) -> None:
    """Undo `_swap_in`: the old files back in place, newest first."""
    for rel in reversed(replaced):
        os.replace(staging / "old" / rel, d / rel)


def reindex(root: Path) -> dict[str, Any]:
    """Rebuild the index from the entry directories' manifests (staging is ignored and cleaned).

    A sound index is rewritten in one transaction, keeping the row it recorded for every entry
    whose manifest now disagrees with it (trust does not move: `verify` keeps failing that
    entry). A damaged index is moved aside and a complete new one put in its place; a missing
    one is created. Either way nothing is moved or replaced until the new rows are ready, and a
    failure (disk full) leaves the old index as it was."""
    root = Path(root)
    try:
        cleaned = clean_staging(root)
        known, damaged = _recorded_rows(root)
        rows, skipped, notes = [], [], []
        for d in _entry_dirs(root):
            row, why = _reindexed_row(root, d, known)
            if row is None:
                skipped.append(why)
                continue
            rows.append(row)
            notes += [why] if why else []
        aside = None
        if zoo_index.exists(root) and not damaged:
            with zoo_index.write_transaction(root) as conn:
                zoo_index.delete_all(conn)
                for row in rows:
                    zoo_index.insert(conn, row)
        else:
            aside = zoo_index.create(root, rows, replace=True)
    except OSError as err:
        raise ZooError(f"could not rebuild the index of {root}: {fault_text(err)}") from err
    return {
        "entries": len(rows),
        "skipped": skipped,
        "untrusted": notes,
        "staging_removed": cleaned,
        "damaged_index": str(aside) if aside else None,
    }


def _recorded_rows(root: Path) -> tuple[dict[str, dict[str, Any]], bool]:
    """The rows of a sound index by id, and whether the index is damaged (to be replaced)."""
    if not zoo_index.exists(root):
        return {}, False
    try:
        with zoo_index.reader(root) as conn:
            if zoo_index.integrity(conn) != "ok":
                return {}, True
            return {r["id"]: r for r in zoo_index.all_rows(conn)}, False
    except zoo_index.IndexDamaged:
        return {}, True


def _reindexed_row(
    root: Path, d: Path, known: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any] | None, str]:
    """(the row to index, a note) for one entry directory, or (None, why it is skipped)."""
    rel = d.relative_to(root / ENTRIES).as_posix()
    links = links_under(d)
    if links:
        return None, f"{rel}: holds a symbolic link ({links[0]}); entries hold files only"
    try:
        row = entry_row(d)
        manifest = read_json(d / MANIFEST_FILE)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{rel}: unreadable entry ({type(err).__name__}: {err})"
    if row["id"] != rel:
        return None, f"{rel}: its manifest names another id ({row['id']})"
    recorded = known.get(rel)
    if recorded is not None and recorded["files"] != row["files"]:
        return recorded, (
            f"{rel}: its manifest disagrees with the checksums recorded at registration; kept"
            f" the recorded ones (`compress zoo verify {rel}` fails it)"
        )
    bad = id_problems(d, rel, manifest)
    return row, (f"{rel}: {bad[0]} (`compress zoo verify {rel}` fails it)" if bad else "")
