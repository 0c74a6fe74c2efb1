"""The trace store: every step a collector took, in one SQLite file.

Several collector processes may write one file at once (the hosted tool's store failed
with "database is locked" at a concurrency of 2). What makes that hold:

- WAL mode: readers never block the writer, nor the writer readers;
- one writer thread per process, fed by a queue: the episode threads never touch SQLite,
  and what they queued is written in short ``BEGIN IMMEDIATE`` transactions (the write
  lock is taken up front, so two processes queue on ``busy_timeout`` instead of failing
  when a read transaction tries to become a write);
- ``busy_timeout`` long enough to wait out another process's transaction.

Prompts are stored as the task sent them, except that every ``data:`` image is replaced
by a ``sha256:<hex>`` reference into ``images`` (one row per distinct image, so a task
whose frames repeat costs each frame once). Reading a step back puts the data URLs back
byte for byte. This module is the only SQL of ``vlmtune.traces``.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.data.refs import data_url
from vlmtune.traces.prompts import (
    Messages,
    dumps,
    externalize,
    prompt_hash,
    restore,
)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000
_BATCH = 512  # queued writes committed per transaction, at most
_IMAGE_CACHE = 1024  # images kept for reading back (a task's frames often repeat)

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (name TEXT PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, split TEXT NOT NULL, seed INTEGER NOT NULL,
    policy TEXT NOT NULL, model TEXT, image_only INTEGER NOT NULL,
    started REAL NOT NULL, ended REAL, episode_return REAL, steps INTEGER NOT NULL DEFAULT 0,
    success INTEGER, achievements TEXT NOT NULL DEFAULT '[]', error TEXT);
CREATE TABLE IF NOT EXISTS steps (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id), idx INTEGER NOT NULL,
    prompt TEXT NOT NULL, prompt_hash TEXT NOT NULL, completion TEXT, action TEXT,
    valid_action INTEGER NOT NULL, reward REAL NOT NULL, done INTEGER NOT NULL,
    expert_action TEXT, info TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (rollout_id, idx));
CREATE TABLE IF NOT EXISTS images (sha256 TEXT PRIMARY KEY, mime TEXT NOT NULL, bytes BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS rollouts_by_task ON rollouts (task, split, policy);
CREATE INDEX IF NOT EXISTS steps_by_prompt ON steps (prompt_hash);
"""


class TraceStoreError(Exception):
    """The store cannot be opened or written; the message names the file."""


@dataclass(frozen=True)
class Rollout:
    """One episode. ``ended`` is None while it runs (or if its collector died)."""

    id: str
    task: str
    split: str
    seed: int
    policy: str
    model: str | None
    image_only: bool
    started: float
    ended: float | None = None
    episode_return: float | None = None
    steps: int = 0
    success: bool | None = None  # None: the task has no success threshold, or an error
    achievements: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class Step:
    """One decision: the prompt the policy saw, what it answered, what the task made of it."""

    rollout_id: str
    index: int
    prompt: Messages
    completion: str | None  # the policy's text (None: it chose an action directly)
    action: str | None  # the action taken (None: the completion named none)
    valid_action: bool
    reward: float
    done: bool
    expert_action: str | None = None  # the task's expert at this observation
    info: dict[str, Any] = field(default_factory=dict)
    prompt_hash: str = ""  # equal prompts (images included) have equal hashes


# ---- the store ------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(
        str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db


def _retry_locked(fn: Callable[[], Any], what: str) -> Any:
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


def _init_schema(db: sqlite3.Connection, path: Path) -> None:
    mode = _retry_locked(lambda: db.execute("PRAGMA journal_mode = WAL").fetchone()[0], str(path))
    if str(mode).lower() != "wal":
        raise TraceStoreError(f"{path}: cannot use WAL mode here (got {mode!r})")
    db.execute("PRAGMA synchronous = NORMAL")  # WAL keeps the file whole without FULL
    db.execute("BEGIN IMMEDIATE")
    try:
        # Statement by statement: ``executescript`` would commit the transaction first.
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        row = db.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise TraceStoreError(
                f"{path}: trace store schema version {row[0]}; this vlmtune reads "
                f"version {SCHEMA_VERSION}"
            )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


_Write = Callable[[sqlite3.Connection], object]


class _Writer(threading.Thread):
    """Drains the queue into short transactions; the only thread that writes."""

    def __init__(self, db: sqlite3.Connection, path: Path, on_rollback: Callable[[], None]) -> None:
        super().__init__(name=f"trace-writer:{path.name}", daemon=True)
        self.db, self.path, self.on_rollback = db, path, on_rollback
        self.queue: queue.Queue[_Write | threading.Event | None] = queue.Queue()
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

    def _commit(self, writes: list[_Write]) -> None:
        try:
            self._transaction(writes)
        except Exception:
            # One bad write must not cost the batch: redo them one by one.
            for write in writes:
                try:
                    self._transaction([write])
                except Exception as exc:
                    self.error = self.error or TraceStoreError(f"{self.path}: {exc}")

    def _transaction(self, writes: list[_Write]) -> None:
        _retry_locked(lambda: self.db.execute("BEGIN IMMEDIATE"), str(self.path))
        try:
            for write in writes:
                write(self.db)
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # a failed COMMIT may have rolled back already
                self.db.execute("ROLLBACK")
            self.on_rollback()  # what the writes learnt inside it is no longer true
            raise


class TraceStore:
    """Rollouts, steps and images in one SQLite file; thread-safe, multi-process safe.

    Writes are queued and return at once (``flush`` waits for them and raises the first
    write that failed); reads see what is committed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = _connect(self.path)
            _init_schema(self._db, self.path)
            self._read = _connect(self.path)
        except sqlite3.DatabaseError as exc:  # not a database, unreadable, disk full...
            raise TraceStoreError(f"{self.path}: {exc}") from None
        self._read_lock = threading.Lock()
        # sha256 -> data URL, recent reads: steps showing one frame share one string.
        self._urls: dict[str, str] = {}
        self._known_images: dict[str, str] = {}  # sha256 -> mime, as stored (writer thread)
        self._writer = _Writer(self._db, self.path, self._known_images.clear)
        self._writer.start()
        self._closed = False

    # -- writing (queued) ---------------------------------------------------------------

    def _put(self, write: _Write) -> None:
        if self._closed:
            raise TraceStoreError(f"{self.path}: the store is closed")
        self._writer.queue.put(write)

    def put_task(self, name: str, info: dict[str, Any]) -> None:
        """What the task is (its ``TaskInfo``), so ``filter`` reads it rather than guesses."""
        text = dumps(info)
        self._put(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO tasks (name, info) VALUES (?, ?)", (name, text)
            )
        )

    def start_rollout(
        self,
        *,
        task: str,
        split: str,
        seed: int,
        policy: str,
        model: str | None,
        image_only: bool,
    ) -> str:
        """A new rollout's id (its row is queued, written before any of its steps)."""
        rollout_id = uuid.uuid4().hex
        values = (rollout_id, task, split, seed, policy, model, int(image_only), time.time())
        self._put(
            lambda db: db.execute(
                "INSERT INTO rollouts (id, task, split, seed, policy, model, image_only, started) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
        )
        return rollout_id

    def add_step(self, step: Step) -> None:
        template, images = externalize(step.prompt)
        digest = prompt_hash(template)

        def write(db: sqlite3.Connection) -> None:
            prompt = self._store_images(db, template, images)
            db.execute(
                "INSERT INTO steps (rollout_id, idx, prompt, prompt_hash, completion, action, "
                "valid_action, reward, done, expert_action, info) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    step.rollout_id,
                    step.index,
                    dumps(prompt),
                    digest,
                    step.completion,
                    step.action,
                    int(step.valid_action),
                    step.reward,
                    int(step.done),
                    step.expert_action,
                    dumps(step.info),
                ),
            )

        self._put(write)

    def _store_images(
        self, db: sqlite3.Connection, template: Messages, images: dict[str, tuple[str, bytes]]
    ) -> Messages:
        clash: set[str] = set()
        for digest, (mime, data) in images.items():
            stored = self._known_images.get(digest)
            if stored is None:
                db.execute(
                    "INSERT OR IGNORE INTO images (sha256, mime, bytes) VALUES (?, ?, ?)",
                    (digest, mime, data),
                )
                stored = db.execute(
                    "SELECT mime FROM images WHERE sha256 = ?", (digest,)
                ).fetchone()[0]
                self._known_images[digest] = stored
            if stored != mime:
                clash.add(digest)  # the same bytes under another declared type
        if not clash:
            return template
        return restore(
            template,
            lambda digest: (
                data_url(images[digest][1], images[digest][0]) if digest in clash else None
            ),
        )

    def finish_rollout(
        self,
        rollout_id: str,
        *,
        episode_return: float,
        steps: int,
        success: bool | None,
        achievements: list[str],
        error: str | None,
    ) -> None:
        values = (
            time.time(),
            episode_return,
            steps,
            None if success is None else int(success),
            dumps(achievements),
            error,
            rollout_id,
        )
        self._put(
            lambda db: db.execute(
                "UPDATE rollouts SET ended = ?, episode_return = ?, steps = ?, success = ?, "
                "achievements = ?, error = ? WHERE id = ?",
                values,
            )
        )

    def flush(self) -> None:
        """Wait until every queued write is committed; raise the first that failed."""
        if not self._closed:
            done = threading.Event()
            self._writer.queue.put(done)
            done.wait()
        if self._writer.error is not None:
            raise self._writer.error

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.queue.put(None)
        self._writer.join()
        self._db.close()
        with self._read_lock:
            self._read.close()
        if self._writer.error is not None:
            raise self._writer.error

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._read_lock:
            return self._read.execute(sql, args).fetchall()

    def tasks(self) -> dict[str, dict[str, Any]]:
        return {
            name: json.loads(info) for name, info in self._query("SELECT name, info FROM tasks")
        }

    def rollouts(self) -> list[Rollout]:
        """Every rollout, oldest first."""
        rows = self._query(
            "SELECT id, task, split, seed, policy, model, image_only, started, ended, "
            "episode_return, steps, success, achievements, error FROM rollouts "
            "ORDER BY started, id"
        )
        return [
            Rollout(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                bool(r[6]),
                r[7],
                r[8],
                r[9],
                r[10],
                None if r[11] is None else bool(r[11]),
                json.loads(r[12]),
                r[13],
            )
            for r in rows
        ]

    def steps(self, rollout_id: str) -> list[Step]:
        """A rollout's steps in order, prompts restored exactly as the task sent them."""
        rows = self._query(
            "SELECT rollout_id, idx, prompt, completion, action, valid_action, reward, done, "
            "expert_action, info, prompt_hash FROM steps WHERE rollout_id = ? ORDER BY idx",
            (rollout_id,),
        )
        return [
            Step(
                r[0],
                r[1],
                self._restore(json.loads(r[2])),
                r[3],
                r[4],
                bool(r[5]),
                r[6],
                bool(r[7]),
                r[8],
                json.loads(r[9]),
                r[10],
            )
            for r in rows
        ]

    def iter_steps(self) -> Iterator[tuple[Rollout, list[Step]]]:
        for rollout in self.rollouts():
            yield rollout, self.steps(rollout.id)

    def _restore(self, template: Messages) -> Messages:
        return restore(template, self._image)

    def _image(self, digest: str) -> str | None:
        found = self._urls.get(digest)
        if found is None:
            rows = self._query("SELECT mime, bytes FROM images WHERE sha256 = ?", (digest,))
            if not rows:
                return None
            found = data_url(rows[0][1], rows[0][0])
            with self._read_lock:
                if len(self._urls) >= _IMAGE_CACHE:
                    self._urls.pop(next(iter(self._urls)))
                self._urls[digest] = found
        return found

    def counts(self) -> dict[str, int]:
        """Rows per table (images: distinct images)."""
        return {
            table: self._query(f"SELECT COUNT(*) FROM {table}")[0][0]
            for table in ("rollouts", "steps", "images")
        }
