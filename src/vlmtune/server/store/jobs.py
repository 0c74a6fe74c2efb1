"""The job control plane's rows: jobs, their numbered events, and uploaded files
(``server/files.py``; their bytes live under ``<data-dir>/files/``)."""

from __future__ import annotations

import json
import time
from typing import Any

from vlmtune.server.store.db import Db, owned

# What a job's owner may change (``update_job``); id, kind and created never change.
_JOB_COLUMNS = frozenset(
    {"name", "state", "config", "run_dir", "model_id", "error", "exit_code", "updated"}
)


# ---- jobs ---------------------------------------------------------------------------
def add_job(
    db: Db, job_id: str, kind: str, name: str, state: str, config: dict, tenant: str
) -> None:
    now = time.time()
    db.insert("jobs", id=job_id, kind=kind, name=name, state=state, config=config,
              created=now, updated=now, tenant=tenant)  # fmt: skip


def job(db: Db, job_id: str, tenant: str | None) -> dict[str, Any] | None:
    where, params = owned(tenant)
    return db.one("SELECT * FROM jobs WHERE id = ?" + where, (job_id, *params))


def jobs(db: Db, kind: str | None, state: str | None, tenant: str | None) -> list[dict[str, Any]]:
    where = {k: v for k, v in (("kind", kind), ("state", state), ("tenant", tenant)) if v}
    sql = "SELECT * FROM jobs"
    if where:
        sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
    return db.all(sql + " ORDER BY created DESC", tuple(where.values()))


def next_queued_job(db: Db) -> dict[str, Any] | None:
    return db.one(
        "SELECT * FROM jobs WHERE state = 'queued' AND kind = 'toml' ORDER BY updated LIMIT 1"
    )


def update_job(db: Db, job_id: str, **values: Any) -> None:
    unknown = set(values) - _JOB_COLUMNS
    if unknown:
        raise ValueError(f"jobs has no columns {sorted(unknown)}")
    db.update("jobs", {"id": job_id}, **values)


# ---- job events ---------------------------------------------------------------------
def add_event(db: Db, job_id: str, type_: str, message: str, data: dict[str, Any] | None) -> int:
    with db.lock:
        row = db.one("SELECT MAX(seq) AS m FROM job_events WHERE job_id = ?", (job_id,))
        seq = (row["m"] if row and row["m"] is not None else 0) + 1
        db.execute(
            "INSERT INTO job_events (job_id, seq, time, type, message, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, seq, time.time(), type_, message, json.dumps(data or {})),
        )
        return seq


def events(db: Db, job_id: str, after: int, limit: int) -> list[dict[str, Any]]:
    return db.all(
        "SELECT seq, time, type, message, data FROM job_events "
        "WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        (job_id, after, limit),
    )


# ---- uploaded files -----------------------------------------------------------------
def add_file(
    db: Db,
    file_id: str,
    *,
    filename: str,
    purpose: str,
    size: int,
    sha256: str,
    path: str,
    tenant: str,
) -> None:
    db.insert(
        "files", id=file_id, filename=filename, purpose=purpose, bytes=size, sha256=sha256,
        path=path, created=time.time(), tenant=tenant,
    )  # fmt: skip


def file(db: Db, file_id: str, tenant: str | None) -> dict[str, Any] | None:
    where, params = owned(tenant)
    return db.one("SELECT * FROM files WHERE id = ?" + where, (file_id, *params))


def files(db: Db, purpose: str | None, tenant: str | None) -> list[dict[str, Any]]:
    where = {k: v for k, v in (("purpose", purpose), ("tenant", tenant)) if v is not None}
    sql = "SELECT * FROM files"
    if where:
        sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
    return db.all(sql + " ORDER BY created DESC", tuple(where.values()))


def delete_file(db: Db, file_id: str) -> bool:
    return bool(db.execute("DELETE FROM files WHERE id = ?", (file_id,)))
