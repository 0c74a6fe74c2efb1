"""SQLite state of a server: everything that must survive a restart.

One file (``<data-dir>/server.db``) holds API keys (hashed), sessions, training runs
(base model, LoRA rank, engine config), their checkpoints (paths under the data
dir), jobs with their events, promoted models, uploaded files (their bytes live
under ``<data-dir>/files/``) and deployments with what each has hot-loaded. Tensors never go in here: they
live in checkpoint directories, and the rows point at them.

This is the only module that writes SQL: the rest of the server asks named questions
(``run``, ``add_checkpoint``, ``next_queued_job``...), and a test fails if SQL appears
anywhere else in the package (``tests/server/test_store.py``).

One connection guarded by a lock: the server's writes are tiny and rare compared
with a training step, and a single connection keeps SQLite's locking out of the way.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
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
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, path TEXT NOT NULL, created REAL NOT NULL,
    tenant TEXT NOT NULL DEFAULT 'default');
CREATE TABLE IF NOT EXISTS deployments (
    tenant TEXT NOT NULL, id TEXT NOT NULL, base_model TEXT NOT NULL, config TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0, loaded_identity TEXT, loaded_run TEXT,
    loaded_path TEXT, load_target TEXT, load_error TEXT, created REAL NOT NULL,
    updated REAL NOT NULL, PRIMARY KEY (tenant, id));
"""

# Columns added after the first release: ``CREATE TABLE IF NOT EXISTS`` leaves an existing
# database's tables as they were, so ``_migrate`` adds each one that is missing.
# Every tenant-owned table carries its owner; a checkpoint belongs to its run's tenant.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("api_keys", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("api_keys", "operator", "INTEGER NOT NULL DEFAULT 0"),
    ("sessions", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("runs", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("jobs", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("models", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("sampling_sessions", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
)

_JSON_COLUMNS = ("config", "meta", "user_metadata", "data", "source")
# What a deployment's owner may change (``update_deployment``): tenant, id, base model and
# created never change.
_DEPLOYMENT_COLUMNS = frozenset(
    {"config", "generation", "loaded_identity", "loaded_run", "loaded_path", "load_target",
     "load_error", "updated"}
)  # fmt: skip
# What a job's owner may change (``update_job``); id, kind and created never change.
_JOB_COLUMNS = frozenset(
    {"name", "state", "config", "run_dir", "model_id", "error", "exit_code", "updated"}
)


def _encoded(values: dict[str, Any]) -> tuple:
    return tuple(
        json.dumps(v) if k in _JSON_COLUMNS and not isinstance(v, str) else v
        for k, v in values.items()
    )


def _owned(tenant: str | None) -> tuple[str, tuple]:
    """SQL keeping one tenant's rows; None keeps all (an operator, or the server itself)."""
    return ("", ()) if tenant is None else (" AND tenant = ?", (tenant,))


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
        self._migrate()

    def _migrate(self) -> None:
        for table, column, declaration in ADDED_COLUMNS:
            have = {r["name"] for r in self._all(f"PRAGMA table_info({table})")}
            if have and column not in have:
                self._execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- the only SQL: private helpers, then one named method per question ------------
    def _execute(self, sql: str, params: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, params).rowcount

    def _one(self, sql: str, params: tuple = ()) -> dict[str, Any] | None:
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _count(self, sql: str, params: tuple = ()) -> int:
        row = self._one(sql, params)
        return int(row["n"]) if row else 0

    def _insert(self, table: str, **values: Any) -> None:
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self._execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", _encoded(values))

    def _update(self, table: str, key: dict[str, Any], **values: Any) -> int:
        sets = ", ".join(f"{k} = ?" for k in values)
        where = " AND ".join(f"{k} = ?" for k in key)
        return self._execute(
            f"UPDATE {table} SET {sets} WHERE {where}", _encoded(values) + tuple(key.values())
        )

    # ---- API keys -------------------------------------------------------------------
    def add_api_key(
        self,
        kid: str,
        salt: bytes,
        digest: bytes,
        label: str,
        tenant: str = "default",
        operator: bool = False,
    ) -> None:
        self._insert(
            "api_keys", kid=kid, salt=salt, digest=digest, label=label, created=time.time(),
            tenant=tenant, operator=int(operator),
        )  # fmt: skip

    def api_key(self, kid: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM api_keys WHERE kid = ?", (kid,))

    def api_keys(self) -> list[dict[str, Any]]:
        """Every key's id, label, creation time, status and tenant (never its salt or digest)."""
        return self._all(
            "SELECT kid, label, created, revoked, tenant, operator FROM api_keys ORDER BY created"
        )

    def active_key_count(self) -> int:
        return self._count("SELECT COUNT(*) AS n FROM api_keys WHERE revoked = 0")

    def revoke_api_key(self, kid: str) -> bool:
        return bool(self._update("api_keys", {"kid": kid}, revoked=1))

    # ---- sessions -------------------------------------------------------------------
    def add_session(self, session_id: str, meta: dict[str, Any], tenant: str = "default") -> None:
        now = time.time()
        self._insert(
            "sessions", id=session_id, created=now, last_seen=now, meta=meta, tenant=tenant
        )

    def session(self, session_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The session, if ``tenant`` (None: any) owns it."""
        owned, params = _owned(tenant)
        return self._one("SELECT * FROM sessions WHERE id = ?" + owned, (session_id, *params))

    def has_session(self, session_id: str, tenant: str | None = None) -> bool:
        return self.session(session_id, tenant) is not None

    def touch_session(
        self, session_id: str, status: str | None = None, tenant: str | None = None
    ) -> bool:
        """Record a sign of life (and a new status); False for an unknown session (or
        one that ``tenant`` does not own)."""
        if tenant is not None and not self.has_session(session_id, tenant):
            return False
        values: dict[str, Any] = {"last_seen": time.time()}
        if status is not None:
            values["status"] = status
        return bool(self._update("sessions", {"id": session_id}, **values))

    def session_count(self) -> int:
        return self._count("SELECT COUNT(*) AS n FROM sessions")

    # ---- runs -----------------------------------------------------------------------
    def add_run(
        self,
        run_id: str,
        *,
        session_id: str | None,
        job_id: str | None,
        base_model: str,
        lora_rank: int,
        config: dict[str, Any],
        run_dir: str,
        user_metadata: dict[str, Any] | None,
        tenant: str = "default",
    ) -> None:
        now = time.time()
        self._insert(
            "runs", id=run_id, session_id=session_id, job_id=job_id, base_model=base_model,
            lora_rank=lora_rank, config=config, dir=run_dir, created=now, last_request=now,
            user_metadata=user_metadata or {}, tenant=tenant,
        )  # fmt: skip

    def run(
        self, run_id: str, include_deleted: bool = False, tenant: str | None = None
    ) -> dict[str, Any] | None:
        """The run, if ``tenant`` (None: any) owns it."""
        owned, params = _owned(tenant)
        live = "" if include_deleted else " AND deleted = 0"
        return self._one("SELECT * FROM runs WHERE id = ?" + live + owned, (run_id, *params))

    def runs_page(
        self, limit: int, offset: int, tenant: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """(live runs of ``tenant`` (None: all), newest first, from ``offset``; how many)."""
        owned, params = _owned(tenant)
        rows = self._all(
            "SELECT * FROM runs WHERE deleted = 0" + owned + " ORDER BY created DESC "
            "LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        total = self._count("SELECT COUNT(*) AS n FROM runs WHERE deleted = 0" + owned, params)
        return rows, total

    def touch_run(self, run_id: str, step: int | None = None) -> None:
        """A request reached the run (and, with ``step``, its optimizer is at that step)."""
        values: dict[str, Any] = {"last_request": time.time()}
        if step is not None:
            values["step"] = step
        self._update("runs", {"id": run_id}, **values)

    def job_run_ids(self, job_id: str) -> list[str]:
        return [r["id"] for r in self._all("SELECT id FROM runs WHERE job_id = ?", (job_id,))]

    def delete_job_runs(self, job_id: str) -> None:
        """Mark a job's runs deleted; their rows stay for the checkpoints that point at them."""
        self._update("runs", {"job_id": job_id}, deleted=1)

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
        self._execute(
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
            return self._all(
                "SELECT * FROM checkpoints WHERE run_id = ? ORDER BY created", (run_id,)
            )
        return self._all(
            "SELECT * FROM checkpoints WHERE run_id = ? AND kind = ? ORDER BY created",
            (run_id, kind),
        )

    def checkpoint(self, run_id: str, kind: str, name: str) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ?",
            (run_id, kind, name),
        )

    def job_checkpoints(self, job_id: str, kind: str, name: str) -> list[dict[str, Any]]:
        """The checkpoints called ``name`` in any run of the job."""
        return self._all(
            "SELECT c.* FROM checkpoints c JOIN runs r ON r.id = c.run_id "
            "WHERE r.job_id = ? AND c.kind = ? AND c.name = ?",
            (job_id, kind, name),
        )

    # ---- sampling sessions ----------------------------------------------------------
    def add_sampling_session(
        self,
        session_id: str,
        kind: str,
        run_id: str | None,
        path: str | None,
        base_model: str,
        tenant: str = "default",
    ) -> None:
        self._insert(
            "sampling_sessions", id=session_id, kind=kind, run_id=run_id, path=path,
            base_model=base_model, created=time.time(), tenant=tenant,
        )  # fmt: skip

    def sampling_session(self, session_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        owned, params = _owned(tenant)
        return self._one(
            "SELECT * FROM sampling_sessions WHERE id = ?" + owned, (session_id, *params)
        )

    # ---- jobs -----------------------------------------------------------------------
    def add_job(
        self,
        job_id: str,
        kind: str,
        name: str,
        state: str,
        config: dict,
        tenant: str = "default",
    ) -> None:
        now = time.time()
        self._insert("jobs", id=job_id, kind=kind, name=name, state=state, config=config,
                     created=now, updated=now, tenant=tenant)  # fmt: skip

    def job(self, job_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The job, if ``tenant`` (None: any) owns it."""
        owned, params = _owned(tenant)
        return self._one("SELECT * FROM jobs WHERE id = ?" + owned, (job_id, *params))

    def jobs(
        self, kind: str | None = None, state: str | None = None, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Jobs, newest first, of one kind, in one state and of one tenant where given."""
        where = {k: v for k, v in (("kind", kind), ("state", state), ("tenant", tenant)) if v}
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
        return self._all(sql + " ORDER BY created DESC", tuple(where.values()))

    def next_queued_job(self) -> dict[str, Any] | None:
        """The TOML job that has waited longest in the queue."""
        return self._one(
            "SELECT * FROM jobs WHERE state = 'queued' AND kind = 'toml' ORDER BY updated LIMIT 1"
        )

    def update_job(self, job_id: str, **values: Any) -> None:
        unknown = set(values) - _JOB_COLUMNS
        if unknown:
            raise ValueError(f"jobs has no columns {sorted(unknown)}")
        self._update("jobs", {"id": job_id}, **values)

    # ---- promoted models ------------------------------------------------------------
    def add_model(
        self, model_id: str, path: str, base_model: str, source: dict, tenant: str = "default"
    ) -> None:
        self._insert("models", id=model_id, path=path, base_model=base_model, source=source,
                     created=time.time(), tenant=tenant)  # fmt: skip

    def model(self, model_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The promoted model, if ``tenant`` (None: any) owns it."""
        owned, params = _owned(tenant)
        return self._one("SELECT * FROM models WHERE id = ?" + owned, (model_id, *params))

    def models(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return self._all(
            "SELECT * FROM models WHERE tenant = COALESCE(?, tenant) ORDER BY created", (tenant,)
        )

    # ---- uploaded files (``server/files.py``) ----------------------------------------
    def add_file(
        self,
        file_id: str,
        *,
        filename: str,
        purpose: str,
        size: int,
        sha256: str,
        path: str,
        tenant: str = "default",
    ) -> None:
        self._insert(
            "files", id=file_id, filename=filename, purpose=purpose, bytes=size, sha256=sha256,
            path=path, created=time.time(), tenant=tenant,
        )  # fmt: skip

    def file(self, file_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The uploaded file, if ``tenant`` (None: any) owns it."""
        owned, params = _owned(tenant)
        return self._one("SELECT * FROM files WHERE id = ?" + owned, (file_id, *params))

    def files(self, purpose: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        """Uploaded files, newest first, of one purpose and one tenant where given."""
        where = {k: v for k, v in (("purpose", purpose), ("tenant", tenant)) if v is not None}
        sql = "SELECT * FROM files"
        if where:
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
        return self._all(sql + " ORDER BY created DESC", tuple(where.values()))

    def delete_file(self, file_id: str) -> bool:
        return bool(self._execute("DELETE FROM files WHERE id = ?", (file_id,)))

    # ---- deployments (``server/deployments.py``): keyed by tenant, as account ids are ------
    def add_deployment(
        self, tenant: str, deployment_id: str, base_model: str, config: dict[str, Any]
    ) -> bool:
        """A new deployment; False if ``tenant`` already has one of that id."""
        now = time.time()
        try:
            self._insert(
                "deployments", tenant=tenant, id=deployment_id, base_model=base_model,
                config=config, created=now, updated=now,
            )  # fmt: skip
        except sqlite3.IntegrityError:
            return False
        return True

    def deployment(self, tenant: str, deployment_id: str) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM deployments WHERE tenant = ? AND id = ?", (tenant, deployment_id)
        )

    def update_deployment(self, tenant: str, deployment_id: str, **values: Any) -> None:
        unknown = set(values) - _DEPLOYMENT_COLUMNS
        if unknown:
            raise ValueError(f"deployments has no columns {sorted(unknown)}")
        self._update("deployments", {"tenant": tenant, "id": deployment_id}, **values)

    def delete_deployment(self, tenant: str, deployment_id: str) -> bool:
        return bool(
            self._execute(
                "DELETE FROM deployments WHERE tenant = ? AND id = ?", (tenant, deployment_id)
            )
        )

    # ---- job events -----------------------------------------------------------------
    def add_event(
        self, job_id: str, type_: str, message: str, data: dict[str, Any] | None = None
    ) -> int:
        with self._lock:
            row = self._one("SELECT MAX(seq) AS m FROM job_events WHERE job_id = ?", (job_id,))
            seq = (row["m"] if row and row["m"] is not None else 0) + 1
            self._execute(
                "INSERT INTO job_events (job_id, seq, time, type, message, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, seq, time.time(), type_, message, json.dumps(data or {})),
            )
            return seq

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return self._all(
            "SELECT seq, time, type, message, data FROM job_events "
            "WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after, limit),
        )
