"""The zoo index: one SQLite table (standard library), one row per entry.

WAL mode and a busy timeout let several processes register at once; every write runs in a
`BEGIN IMMEDIATE` transaction, so writers queue instead of failing. JSON-valued fields (files with
their sha256, summary, evaluations) are stored as text.

Opening never creates: an index comes into being only whole, built under a temporary name and
linked into place (`create`), so no process ever sees a half-made or zero-byte index. A file that
is not a complete index (garbage, zero bytes, no table) is damaged, and every SQLite failure
leaves here as one `ZooError` naming the file and what to do (`compress zoo reindex` for a damaged
index, free space for a full disk).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from compressor.errors import ZooError
from compressor.rundir import ZOO_INDEX_FILE

SCHEMA_VERSION = 1
COLUMNS = (
    "id",
    "teacher",
    "recipe",
    "shape",
    "teacher_shape",
    "params",
    "teacher_params",
    "size_bytes",
    "entry_bytes",
    "speedup",
    "quality",
    "quality_value",
    "discrepancy",
    "created",
    "files",
    "summary",
    "evaluations",
)
JSON_COLUMNS = ("files", "summary", "evaluations")
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    teacher TEXT NOT NULL,
    recipe TEXT NOT NULL,
    shape TEXT NOT NULL,
    teacher_shape TEXT NOT NULL,
    params INTEGER NOT NULL,
    teacher_params INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    entry_bytes INTEGER NOT NULL,
    speedup REAL,
    quality TEXT NOT NULL,
    quality_value REAL,
    discrepancy REAL,
    created TEXT NOT NULL,
    files TEXT NOT NULL,
    summary TEXT NOT NULL,
    evaluations TEXT NOT NULL
)
"""


DAMAGED = ("SQLITE_NOTADB", "SQLITE_CORRUPT")
SIDE_FILES = ("-wal", "-shm")  # SQLite's own companions of a WAL database


def path_of(root: Path) -> Path:
    return Path(root) / ZOO_INDEX_FILE


def exists(root: Path) -> bool:
    return path_of(root).exists()


class IndexDamaged(ZooError):
    """The index file exists but is not a sound index: only `compress zoo reindex` helps."""


def damaged(root: Path, why: str) -> IndexDamaged:
    return IndexDamaged(
        f"{path_of(root)}: the zoo index is damaged ({why}); rebuild it from the entries with"
        " `compress zoo reindex`"
    )


def fault(root: Path, err: BaseException) -> ZooError:
    """One clear error for any SQLite or OS failure on the index of `root`."""
    if isinstance(err, ZooError):
        return err
    name = getattr(err, "sqlite_errorname", "")
    if name in DAMAGED or type(err) is sqlite3.DatabaseError:
        return damaged(root, str(err))
    full = (
        name == "SQLITE_FULL"
        or "disk is full" in str(err)
        or getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    )
    what = "the disk is full; free some space and try again" if full else str(err)
    return ZooError(f"{path_of(root)}: could not use the zoo index: {what}")


def read_only(root: Path) -> bool:
    """Whether this process cannot write the zoo's index or its folder (a read-only zoo: a
    shared mount, another user's zoo, a read-only file system)."""
    path = path_of(root)
    return not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK))


def connect(root: Path, timeout_s: float = 120.0, write: bool = True) -> sqlite3.Connection:
    """Open the existing index of the zoo at `root` (never creates one: see `create`);
    autocommit mode, transactions are explicit. Raises ZooError for a missing or damaged index.
    A reader (`write` false) of a zoo it cannot write opens the file read-only and immutable
    (SQLite's WAL needs a writable folder otherwise), so a read-only zoo can be listed, shown,
    verified and reported."""
    path = path_of(root)
    if not path.exists():
        raise ZooError(f"{path}: the zoo index is missing; rebuild it with `compress zoo reindex`")
    mode = "mode=rw"
    if not write and read_only(root):
        mode = "mode=ro&immutable=1"
    elif write and read_only(root):
        raise ZooError(f"{path}: the zoo is read-only for this user; nothing was changed")
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=timeout_s, isolation_level=None
        )
    except sqlite3.Error as err:
        raise fault(root, err) from err
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        if mode == "mode=rw":
            conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        if version != SCHEMA_VERSION or ("entries",) not in tables:
            raise damaged(root, f"no entries table of schema version {SCHEMA_VERSION}")
    except BaseException as err:
        conn.close()
        raise fault(root, err) from err
    return conn


def create(root: Path, rows: list[dict[str, Any]], replace: bool = False) -> Path | None:
    """Build a complete index of `rows` under a temporary name, then put it in place: linked
    (only where no index exists: a concurrent creator wins, and that is fine) or, with `replace`,
    after moving whatever is there aside (`move_aside`, whose result is returned). Nothing is
    moved until the new index is complete; the temporary file is removed on any failure."""
    root, aside = Path(root), None
    tmp = root / f".{ZOO_INDEX_FILE}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            for row in rows:
                insert(conn, row)
            conn.execute("COMMIT")
        finally:
            conn.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if replace:
            aside = move_aside(root)
            os.replace(tmp, path_of(root))
        else:
            with suppress(FileExistsError):  # a concurrent creator won: its index is as good
                os.link(tmp, path_of(root))
    except (OSError, sqlite3.Error) as err:
        raise fault(root, err) from err
    finally:
        for suffix in ("", *SIDE_FILES):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    return aside


def move_aside(root: Path) -> Path | None:
    """Rename a damaged index and its WAL companions out of the way (kept for inspection, never
    read again); returns the new name of the index file, or None when there was none."""
    path, aside = path_of(root), None
    stamp = f".damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for suffix in ("", *SIDE_FILES):
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.rename(src, Path(f"{path}{stamp}{suffix}"))
            aside = aside or Path(f"{path}{stamp}")
    return aside


@contextmanager
def write_transaction(root: Path) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` ... `COMMIT`: one writer at a time; rolled back on any exception.
    SQLite failures leave as ZooError (`fault`)."""
    conn = connect(root)
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            raise fault(root, err) from err
    finally:
        conn.close()


@contextmanager
def reader(root: Path) -> Iterator[sqlite3.Connection]:
    conn = connect(root, write=False)
    try:
        yield conn
    except sqlite3.Error as err:
        raise fault(root, err) from err
    finally:
        conn.close()


def _encode(row: dict[str, Any]) -> tuple:
    return tuple(
        json.dumps(row[c], sort_keys=True) if c in JSON_COLUMNS else row[c] for c in COLUMNS
    )


def _decode(values: tuple) -> dict[str, Any]:
    row = dict(zip(COLUMNS, values, strict=True))
    for c in JSON_COLUMNS:
        row[c] = json.loads(row[c])
    return row


def insert(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    marks = ", ".join("?" for _ in COLUMNS)
    conn.execute(f"INSERT INTO entries ({', '.join(COLUMNS)}) VALUES ({marks})", _encode(row))


def replace(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    sets = ", ".join(f"{c} = ?" for c in COLUMNS[1:])
    conn.execute(f"UPDATE entries SET {sets} WHERE id = ?", (*_encode(row)[1:], row["id"]))


def delete(conn: sqlite3.Connection, entry_id: str) -> None:
    conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))


def delete_all(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM entries")


def get(conn: sqlite3.Connection, entry_id: str) -> dict[str, Any] | None:
    cur = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM entries WHERE id = ?", (entry_id,))
    values = cur.fetchone()
    return _decode(values) if values else None


def all_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    cur = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM entries ORDER BY created, id")
    return [_decode(v) for v in cur.fetchall()]


def all_ids(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT id FROM entries ORDER BY id").fetchall()]


def integrity(conn: sqlite3.Connection) -> str:
    return conn.execute("PRAGMA integrity_check").fetchone()[0]
