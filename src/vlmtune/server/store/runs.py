"""Tinker-protocol state: client sessions, training runs, their checkpoints, and
sampling sessions."""

from __future__ import annotations

import json
import time
from typing import Any

from vlmtune.server.store.db import Db, owned


# ---- sessions -----------------------------------------------------------------------
def add_session(db: Db, session_id: str, meta: dict[str, Any], tenant: str) -> None:
    now = time.time()
    db.insert("sessions", id=session_id, created=now, last_seen=now, meta=meta, tenant=tenant)


def session(db: Db, session_id: str, tenant: str | None) -> dict[str, Any] | None:
    where, params = owned(tenant)
    return db.one("SELECT * FROM sessions WHERE id = ?" + where, (session_id, *params))


def touch_session(db: Db, session_id: str, status: str | None, tenant: str | None) -> bool:
    if tenant is not None and session(db, session_id, tenant) is None:
        return False
    values: dict[str, Any] = {"last_seen": time.time()}
    if status is not None:
        values["status"] = status
    return bool(db.update("sessions", {"id": session_id}, **values))


def session_count(db: Db) -> int:
    return db.count("SELECT COUNT(*) AS n FROM sessions")


# ---- runs ---------------------------------------------------------------------------
def add_run(
    db: Db,
    run_id: str,
    *,
    session_id: str | None,
    job_id: str | None,
    base_model: str,
    lora_rank: int,
    config: dict[str, Any],
    run_dir: str,
    user_metadata: dict[str, Any] | None,
    tenant: str,
) -> None:
    now = time.time()
    db.insert(
        "runs", id=run_id, session_id=session_id, job_id=job_id, base_model=base_model,
        lora_rank=lora_rank, config=config, dir=run_dir, created=now, last_request=now,
        user_metadata=user_metadata or {}, tenant=tenant,
    )  # fmt: skip


def run(db: Db, run_id: str, include_deleted: bool, tenant: str | None) -> dict[str, Any] | None:
    where, params = owned(tenant)
    live = "" if include_deleted else " AND deleted = 0"
    return db.one("SELECT * FROM runs WHERE id = ?" + live + where, (run_id, *params))


def runs_page(
    db: Db, limit: int, offset: int, tenant: str | None
) -> tuple[list[dict[str, Any]], int]:
    where, params = owned(tenant)
    rows = db.all(
        "SELECT * FROM runs WHERE deleted = 0" + where + " ORDER BY created DESC LIMIT ? OFFSET ?",
        (*params, limit, offset),
    )
    total = db.count("SELECT COUNT(*) AS n FROM runs WHERE deleted = 0" + where, params)
    return rows, total


def touch_run(db: Db, run_id: str, step: int | None) -> None:
    values: dict[str, Any] = {"last_request": time.time()}
    if step is not None:
        values["step"] = step
    db.update("runs", {"id": run_id}, **values)


def job_run_ids(db: Db, job_id: str) -> list[str]:
    return [r["id"] for r in db.all("SELECT id FROM runs WHERE job_id = ?", (job_id,))]


def delete_job_runs(db: Db, job_id: str) -> None:
    db.update("runs", {"job_id": job_id}, deleted=1)


# ---- checkpoints --------------------------------------------------------------------
def add_checkpoint(
    db: Db,
    run_id: str,
    kind: str,
    name: str,
    path: str,
    *,
    checkpoint_type: str,
    step: int,
    user_metadata: dict[str, Any] | None,
) -> None:
    db.execute(
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


def checkpoints(db: Db, run_id: str, kind: str | None) -> list[dict[str, Any]]:
    if kind is None:
        return db.all("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY created", (run_id,))
    return db.all(
        "SELECT * FROM checkpoints WHERE run_id = ? AND kind = ? ORDER BY created",
        (run_id, kind),
    )


def checkpoint(db: Db, run_id: str, kind: str, name: str) -> dict[str, Any] | None:
    return db.one(
        "SELECT * FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ?",
        (run_id, kind, name),
    )


def job_checkpoints(db: Db, job_id: str, kind: str, name: str) -> list[dict[str, Any]]:
    return db.all(
        "SELECT c.* FROM checkpoints c JOIN runs r ON r.id = c.run_id "
        "WHERE r.job_id = ? AND c.kind = ? AND c.name = ?",
        (job_id, kind, name),
    )


# ---- sampling sessions --------------------------------------------------------------
def add_sampling_session(
    db: Db,
    session_id: str,
    kind: str,
    run_id: str | None,
    path: str | None,
    base_model: str,
    tenant: str,
) -> None:
    db.insert(
        "sampling_sessions", id=session_id, kind=kind, run_id=run_id, path=path,
        base_model=base_model, created=time.time(), tenant=tenant,
    )  # fmt: skip


def sampling_session(db: Db, session_id: str, tenant: str | None) -> dict[str, Any] | None:
    where, params = owned(tenant)
    return db.one("SELECT * FROM sampling_sessions WHERE id = ?" + where, (session_id, *params))
