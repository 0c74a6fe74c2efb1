"""SQLite state of a server: everything that must survive a restart.

One file (``<data-dir>/server.db``) holds API keys (hashed), sessions, training runs
(base model, LoRA rank, engine config), their checkpoints (paths under the data
dir), jobs with their events, and promoted models. Tensors never go in here: they
live in checkpoint directories, and the rows point at them.

One connection guarded by a lock: the server's writes are tiny and rare compared
with a training step, and a single connection keeps SQLite's locking out of the way.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    kid TEXT PRIMARY KEY, salt BLOB NOT NULL, digest BLOB NOT NULL,
    label TEXT, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, created REAL NOT NULL, last_seen REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'active', meta TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, session_id TEXT, job_id TEXT, base_model TEXT NOT NULL,
    lora_rank INTEGER NOT NULL, config TEXT NOT NULL, dir TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, last_request REAL NOT NULL,
    user_metadata TEXT NOT NULL DEFAULT '{}', deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL,
    checkpoint_type TEXT NOT NULL DEFAULT 'state', step INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, user_metadata TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, kind, name));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
    config TEXT NOT NULL, run_dir TEXT, model_id TEXT, error TEXT, exit_code INTEGER,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, type TEXT NOT NULL,
    message TEXT NOT NULL, data TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (job_id, seq));
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, path TEXT NOT NULL, base_model TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sampling_sessions (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, run_id TEXT, path TEXT,
    base_model TEXT NOT NULL, created REAL NOT NULL);
"""

_JSON_COLUMNS = ("config", "meta", "user_metadata", "data", "source")


def _row(cur: sqlite3.Cursor, values: tuple) -> dict[str, Any]:
    out = {}
    for (name, *_), value in zip(cur.description, values, strict=True):
        out[name] = json.loads(value) if name in _JSON_COLUMNS and value is not None else value
    return out


class Store:
    """Thread-safe access to the server database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = _row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def execute(self, sql: str, params: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, params).rowcount

    def one(self, sql: str, params: tuple = ()) -> dict[str, Any] | None:
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def all(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def insert(self, table: str, **values: Any) -> None:
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        encoded = tuple(
            json.dumps(v) if k in _JSON_COLUMNS and not isinstance(v, str) else v
            for k, v in values.items()
        )
        self.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", encoded)

    def update(self, table: str, key: dict[str, Any], **values: Any) -> int:
        sets = ", ".join(f"{k} = ?" for k in values)
        where = " AND ".join(f"{k} = ?" for k in key)
        encoded = tuple(
            json.dumps(v) if k in _JSON_COLUMNS and not isinstance(v, str) else v
            for k, v in values.items()
        )
        return self.execute(
            f"UPDATE {table} SET {sets} WHERE {where}", encoded + tuple(key.values())
        )

    # ---- checkpoints ----------------------------------------------------------------
    def add_checkpoint(
        self,
        run_id: str,
        kind: str,
        name: str,
        path: str,
        *,
        checkpoint_type: str = "state",
        step: int = 0,
        user_metadata: dict[str, Any] | None = None,
    ) -> None:
        self.execute(
            "INSERT OR REPLACE INTO checkpoints (run_id, kind, name, path, checkpoint_type, "
            "step, created, user_metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                kind,
                name,
                path,
                checkpoint_type,
                step,
                time.time(),
                json.dumps(user_metadata or {}),
            ),
        )

    def checkpoints(self, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        if kind is None:
            return self.all(
                "SELECT * FROM checkpoints WHERE run_id = ? ORDER BY created", (run_id,)
            )
        return self.all(
            "SELECT * FROM checkpoints WHERE run_id = ? AND kind = ? ORDER BY created",
            (run_id, kind),
        )

    # ---- job events -----------------------------------------------------------------
    def add_event(
        self, job_id: str, type_: str, message: str, data: dict[str, Any] | None = None
    ) -> int:
        with self._lock:
            row = self.one("SELECT MAX(seq) AS m FROM job_events WHERE job_id = ?", (job_id,))
            seq = (row["m"] if row and row["m"] is not None else 0) + 1
            self.execute(
                "INSERT INTO job_events (job_id, seq, time, type, message, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, seq, time.time(), type_, message, json.dumps(data or {})),
            )
            return seq

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return self.all(
            "SELECT seq, time, type, message, data FROM job_events "
            "WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after, limit),
        )
