"""SQLite state of a server: everything that must survive a restart.

One file (``<data-dir>/server.db``) holds API keys (hashed), sessions, training runs
(base model, LoRA rank, engine config), their checkpoints (paths under the data
dir), jobs with their events, promoted models, uploaded files (their bytes live
under ``<data-dir>/files/``) and deployments with what each has hot-loaded. Tensors never go in here: they
live in checkpoint directories, and the rows point at them.

This package is the only place that writes SQL: the rest of the server asks ``Store``
named questions (``run``, ``add_checkpoint``, ``next_queued_job``...), and a test fails if
SQL appears anywhere else in the package (``tests/server/test_store.py``). ``Store``
holds the defaults and says what each question means; the SQL lives in one module per
group of tables: ``schema`` (the tables and their migrations), ``keys``, ``runs``
(sessions, runs, checkpoints, sampling sessions), ``jobs`` (jobs, events, uploaded
files) and ``models`` (promoted models, deployments), all through ``db.Db``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmtune.server.store import jobs, keys, models, runs, schema
from vlmtune.server.store.db import Db

__all__ = ["Store"]


class Store:
    """Thread-safe access to the server database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Db(self.path)
        schema.create(self._db)

    def close(self) -> None:
        self._db.close()

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
        keys.add_api_key(self._db, kid, salt, digest, label, tenant, operator)

    def api_key(self, kid: str) -> dict[str, Any] | None:
        return keys.api_key(self._db, kid)

    def api_keys(self) -> list[dict[str, Any]]:
        """Every key's id, label, creation time, status and tenant (never its salt or digest)."""
        return keys.api_keys(self._db)

    def active_key_count(self) -> int:
        return keys.active_key_count(self._db)

    def revoke_api_key(self, kid: str) -> bool:
        return keys.revoke_api_key(self._db, kid)

    # ---- sessions -------------------------------------------------------------------
    def add_session(self, session_id: str, meta: dict[str, Any], tenant: str = "default") -> None:
        runs.add_session(self._db, session_id, meta, tenant)

    def session(self, session_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The session, if ``tenant`` (None: any) owns it."""
        return runs.session(self._db, session_id, tenant)

    def has_session(self, session_id: str, tenant: str | None = None) -> bool:
        return self.session(session_id, tenant) is not None

    def touch_session(
        self, session_id: str, status: str | None = None, tenant: str | None = None
    ) -> bool:
        """Record a sign of life (and a new status); False for an unknown session (or
        one that ``tenant`` does not own)."""
        return runs.touch_session(self._db, session_id, status, tenant)

    def session_count(self) -> int:
        return runs.session_count(self._db)

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
        runs.add_run(
            self._db, run_id, session_id=session_id, job_id=job_id, base_model=base_model,
            lora_rank=lora_rank, config=config, run_dir=run_dir, user_metadata=user_metadata,
            tenant=tenant,
        )  # fmt: skip

    def run(
        self, run_id: str, include_deleted: bool = False, tenant: str | None = None
    ) -> dict[str, Any] | None:
        """The run, if ``tenant`` (None: any) owns it."""
        return runs.run(self._db, run_id, include_deleted, tenant)

    def runs_page(
        self, limit: int, offset: int, tenant: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """(live runs of ``tenant`` (None: all), newest first, from ``offset``; how many)."""
        return runs.runs_page(self._db, limit, offset, tenant)

    def touch_run(self, run_id: str, step: int | None = None) -> None:
        """A request reached the run (and, with ``step``, its optimizer is at that step)."""
        runs.touch_run(self._db, run_id, step)

    def job_run_ids(self, job_id: str) -> list[str]:
        return runs.job_run_ids(self._db, job_id)

    def delete_job_runs(self, job_id: str) -> None:
        """Mark a job's runs deleted; their rows stay for the checkpoints that point at them."""
        runs.delete_job_runs(self._db, job_id)

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
        runs.add_checkpoint(
            self._db, run_id, kind, name, path, checkpoint_type=checkpoint_type, step=step,
            user_metadata=user_metadata,
        )  # fmt: skip

    def checkpoints(self, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        return runs.checkpoints(self._db, run_id, kind)

    def checkpoint(self, run_id: str, kind: str, name: str) -> dict[str, Any] | None:
        return runs.checkpoint(self._db, run_id, kind, name)

    def job_checkpoints(self, job_id: str, kind: str, name: str) -> list[dict[str, Any]]:
        """The checkpoints called ``name`` in any run of the job."""
        return runs.job_checkpoints(self._db, job_id, kind, name)

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
        runs.add_sampling_session(self._db, session_id, kind, run_id, path, base_model, tenant)

    def sampling_session(self, session_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        return runs.sampling_session(self._db, session_id, tenant)

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
        jobs.add_job(self._db, job_id, kind, name, state, config, tenant)

    def job(self, job_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The job, if ``tenant`` (None: any) owns it."""
        return jobs.job(self._db, job_id, tenant)

    def jobs(
        self, kind: str | None = None, state: str | None = None, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Jobs, newest first, of one kind, in one state and of one tenant where given."""
        return jobs.jobs(self._db, kind, state, tenant)

    def next_queued_job(self) -> dict[str, Any] | None:
        """The TOML job that has waited longest in the queue."""
        return jobs.next_queued_job(self._db)

    def update_job(self, job_id: str, **values: Any) -> None:
        jobs.update_job(self._db, job_id, **values)

    # ---- job events -----------------------------------------------------------------
    def add_event(
        self, job_id: str, type_: str, message: str, data: dict[str, Any] | None = None
    ) -> int:
        return jobs.add_event(self._db, job_id, type_, message, data)

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return jobs.events(self._db, job_id, after, limit)

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
        jobs.add_file(
            self._db, file_id, filename=filename, purpose=purpose, size=size, sha256=sha256,
            path=path, tenant=tenant,
        )  # fmt: skip

    def file(self, file_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The uploaded file, if ``tenant`` (None: any) owns it."""
        return jobs.file(self._db, file_id, tenant)

    def files(self, purpose: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        """Uploaded files, newest first, of one purpose and one tenant where given."""
        return jobs.files(self._db, purpose, tenant)

    def delete_file(self, file_id: str) -> bool:
        return jobs.delete_file(self._db, file_id)

    # ---- promoted models ------------------------------------------------------------
    def add_model(
        self, model_id: str, path: str, base_model: str, source: dict, tenant: str = "default"
    ) -> None:
        models.add_model(self._db, model_id, path, base_model, source, tenant)

    def model(self, model_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The promoted model, if ``tenant`` (None: any) owns it."""
        return models.model(self._db, model_id, tenant)

    def models(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return models.models(self._db, tenant)

    # ---- deployments (``server/deployments.py``): keyed by tenant, as account ids are ------
    def add_deployment(
        self, tenant: str, deployment_id: str, base_model: str, config: dict[str, Any]
    ) -> bool:
        """A new deployment; False if ``tenant`` already has one of that id."""
        return models.add_deployment(self._db, tenant, deployment_id, base_model, config)

    def deployment(self, tenant: str, deployment_id: str) -> dict[str, Any] | None:
        return models.deployment(self._db, tenant, deployment_id)

    def update_deployment(self, tenant: str, deployment_id: str, **values: Any) -> None:
        models.update_deployment(self._db, tenant, deployment_id, **values)

    def delete_deployment(self, tenant: str, deployment_id: str) -> bool:
        return models.delete_deployment(self._db, tenant, deployment_id)
