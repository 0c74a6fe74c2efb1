"""The store's one SQLite connection: a lock, rows as dicts, and the generic statements.

One connection guarded by a lock: the server's writes are tiny and rare compared
with a training step, and a single connection keeps SQLite's locking out of the way.
The lock is re-entrant so a named question can hold it across two statements
(``jobs.add_event``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

# Columns stored as JSON text: written from Python values, read back decoded.
JSON_COLUMNS = ("config", "meta", "user_metadata", "data", "source")


def _encoded(values: dict[str, Any]) -> tuple:
    return tuple(
        json.dumps(v) if k in JSON_COLUMNS and not isinstance(v, str) else v
        for k, v in values.items()
    )


def _row(cur: sqlite3.Cursor, values: tuple) -> dict[str, Any]:
    out = {}
    for (name, *_), value in zip(cur.description, values, strict=True):
        out[name] = json.loads(value) if name in JSON_COLUMNS and value is not None else value
    return out


def owned(tenant: str | None) -> tuple[str, tuple]:
    """SQL keeping one tenant's rows; None keeps all (an operator, or the server itself)."""
    return ("", ()) if tenant is None else (" AND tenant = ?", (tenant,))


class Db:
    """Thread-safe statements on one connection; every row comes back as a dict."""

    def __init__(self, path: Path) -> None:
        self.lock = threading.RLock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = _row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        with self.lock:
            self._conn.close()

    def script(self, sql: str) -> None:
        with self.lock:
            self._conn.executescript(sql)

    def execute(self, sql: str, params: tuple = ()) -> int:
        with self.lock:
            return self._conn.execute(sql, params).rowcount

    def one(self, sql: str, params: tuple = ()) -> dict[str, Any] | None:
        with self.lock:
            return self._conn.execute(sql, params).fetchone()

    def all(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self.lock:
            return self._conn.execute(sql, params).fetchall()

    def count(self, sql: str, params: tuple = ()) -> int:
        row = self.one(sql, params)
        return int(row["n"]) if row else 0

    def insert(self, table: str, **values: Any) -> None:
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", _encoded(values))

    def update(self, table: str, key: dict[str, Any], **values: Any) -> int:
        sets = ", ".join(f"{k} = ?" for k in values)
        where = " AND ".join(f"{k} = ?" for k in key)
        return self.execute(
            f"UPDATE {table} SET {sets} WHERE {where}", _encoded(values) + tuple(key.values())
        )
