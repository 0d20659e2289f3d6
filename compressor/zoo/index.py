"""The zoo index: one SQLite table (standard library), one row per entry.

WAL mode and a busy timeout let several processes register at once; every write runs in a
`BEGIN IMMEDIATE` transaction, so writers queue instead of failing. JSON-valued fields (files with
their sha256, summary, evaluations) are stored as text.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def connect(root: Path, timeout_s: float = 120.0) -> sqlite3.Connection:
    """Open (creating if needed) the index of the zoo at `root`; autocommit mode, transactions
    are explicit."""
    root.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(root / ZOO_INDEX_FILE, timeout=timeout_s, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    return conn


def exists(root: Path) -> bool:
    return (root / ZOO_INDEX_FILE).exists()


@contextmanager
def write_transaction(root: Path) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` ... `COMMIT`: one writer at a time; rolled back on any exception."""
    conn = connect(root)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()


@contextmanager
def reader(root: Path) -> Iterator[sqlite3.Connection]:
    conn = connect(root)
    try:
        yield conn
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
