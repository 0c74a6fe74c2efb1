"""The trace store's connections, and the one thread per process that writes.

Several collector processes may write one file at once (the hosted tool's store failed
with "database is locked" at a concurrency of 2). What makes that hold:

- WAL mode: readers never block the writer, nor the writer readers;
- one writer thread per process, fed by a queue: the episode threads never touch SQLite,
  and what they queued is written in short ``BEGIN IMMEDIATE`` transactions (the write
  lock is taken up front, so two processes queue on ``busy_timeout`` instead of failing
  when a read transaction tries to become a write);
- ``busy_timeout`` long enough to wait out another process's transaction.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmtune.traces.store.records import TraceStoreError

BUSY_TIMEOUT_MS = 60_000
_BATCH = 512  # queued writes committed per transaction, at most


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(
        str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db


def retry_locked(fn: Callable[[], Any], what: str) -> Any:
    """Switching to WAL can report "locked" without waiting on busy_timeout: retry it."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise TraceStoreError(f"{what}: still locked after {BUSY_TIMEOUT_MS} ms") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def use_wal(db: sqlite3.Connection, path: Path) -> None:
    mode = retry_locked(lambda: db.execute("PRAGMA journal_mode = WAL").fetchone()[0], str(path))
    if str(mode).lower() != "wal":
        raise TraceStoreError(f"{path}: cannot use WAL mode here (got {mode!r})")
    db.execute("PRAGMA synchronous = NORMAL")  # WAL keeps the file whole without FULL


Write = Callable[[sqlite3.Connection], object]


class Writer(threading.Thread):
    """Drains the queue into short transactions; the only thread that writes."""

    def __init__(self, db: sqlite3.Connection, path: Path, on_rollback: Callable[[], None]) -> None:
        super().__init__(name=f"trace-writer:{path.name}", daemon=True)
        self.db, self.path, self.on_rollback = db, path, on_rollback
        self.queue: queue.Queue[Write | threading.Event | None] = queue.Queue()
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            first = self.queue.get()
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            writes = [w for w in batch if w is not None and not isinstance(w, threading.Event)]
            if writes:
                self._commit(writes)
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
            if any(item is None for item in batch):
                return

    def _commit(self, writes: list[Write]) -> None:
        try:
            self._transaction(writes)
        except Exception:
            # One bad write must not cost the batch: redo them one by one.
            for write in writes:
                try:
                    self._transaction([write])
                except Exception as exc:
                    self.error = self.error or TraceStoreError(f"{self.path}: {exc}")

    def _transaction(self, writes: list[Write]) -> None:
        retry_locked(lambda: self.db.execute("BEGIN IMMEDIATE"), str(self.path))
        try:
            for write in writes:
                write(self.db)
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # a failed COMMIT may have rolled back already
                self.db.execute("ROLLBACK")
            self.on_rollback()  # what the writes learnt inside it is no longer true
            raise
