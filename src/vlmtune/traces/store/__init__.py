"""The trace store: every step a collector took, in one SQLite file.

Several collector processes may write one file at once: ``db`` says what makes that
hold (WAL, one writer thread per process, ``busy_timeout``).

Prompts are stored as the task sent them, except that every ``data:`` image is replaced
by a ``sha256:<hex>`` reference into ``images`` (one row per distinct image, so a task
whose frames repeat costs each frame once). Reading a step back puts the data URLs back
byte for byte. This package is the only SQL of ``vlmtune.traces``
(``tests/server/test_store.py`` fails on SQL anywhere else): ``TraceStore`` here writes
and reads the rows, ``db`` holds the connections and the writer thread, ``schema`` the
tables and their version, ``records`` the ``Rollout`` and ``Step`` it hands back.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmtune.data.refs import data_url
from vlmtune.traces.prompts import Messages, dumps, externalize, prompt_hash, restore
from vlmtune.traces.store import schema
from vlmtune.traces.store.db import BUSY_TIMEOUT_MS, Write, Writer, connect, use_wal
from vlmtune.traces.store.records import Rollout, Step, TraceStoreError
from vlmtune.traces.store.schema import SCHEMA, SCHEMA_VERSION

__all__ = [
    "BUSY_TIMEOUT_MS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Rollout",
    "Step",
    "TraceStore",
    "TraceStoreError",
]

_IMAGE_CACHE = 1024  # images kept for reading back (a task's frames often repeat)


class TraceStore:
    """Rollouts, steps and images in one SQLite file; thread-safe, multi-process safe.

    Writes are queued and return at once (``flush`` waits for them and raises the first
    write that failed); reads see what is committed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = connect(self.path)
            use_wal(self._db, self.path)
            schema.create(self._db, self.path)
            self._read = connect(self.path)
        except sqlite3.DatabaseError as exc:  # not a database, unreadable, disk full...
            raise TraceStoreError(f"{self.path}: {exc}") from None
        self._read_lock = threading.Lock()
        # sha256 -> data URL, recent reads: steps showing one frame share one string.
        self._urls: dict[str, str] = {}
        self._known_images: dict[str, str] = {}  # sha256 -> mime, as stored (writer thread)
        self._writer = Writer(self._db, self.path, self._known_images.clear)
        self._writer.start()
        self._closed = False

    # -- writing (queued) ---------------------------------------------------------------

    def _put(self, write: Write) -> None:
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
