"""Jobs: trainer endpoints (interactive runs) and TOML jobs run in worker processes.

This module is the jobs' lifecycle: created, submitted, queued, launched when a slot is
free, cancelled, resumed, deleted, their checkpoints promoted. A TOML job's worker
process (``vlmtune train`` in its own process, its progress and stderr, the model
promoted when it succeeds) is ``job_process``'s. Job state lives in the store: after a
restart a job that was running is ``interrupted`` and can be resumed (``--resume``
continues from its last checkpoint).

A TOML job is validated and confined when it is submitted (``job_access``): a bad one
is refused with every problem named by its TOML key and never queued; a good one's
folder holds the TOML as sent (``submitted.toml``) and as the worker runs it
(``config.toml``: uploads replaced by their stored paths, overrides applied).
"""

from __future__ import annotations

import builtins
import shutil
import threading
import time
import tomllib
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlmtune.config import dump_toml
from vlmtune.models.registry import same_model
from vlmtune.protocol.errors import BadRequest, NotFound
from vlmtune.protocol.paths import checkpoint_name, is_tinker_path
from vlmtune.server import catalog
from vlmtune.server.files import FileStore
from vlmtune.server.job_access import DataAccess, resolved_roots, validated_job
from vlmtune.server.job_process import JobProcess
from vlmtune.server.run_config import engine_config
from vlmtune.server.runs import RunManager
from vlmtune.server.store import Store

TERMINAL = ("succeeded", "failed", "cancelled", "deleted")
PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "shape_id": "default",
        "description": "one device, micro-batch 1, no packing, precision chosen by the device",
        "devices": 1,
        "micro_batch_size": 1,
        "packing": False,
        "max_sequence_length": 4096,
        "precision": "auto",
    }
}


class JobExists(BadRequest):
    """A client-chosen job id that is taken (the control plane answers 409)."""


def resolve_profile(shape_id: str) -> dict[str, Any]:
    if shape_id not in PROFILES:
        raise NotFound(
            f"unknown training shape {shape_id!r}: training shapes are not implemented yet; "
            f"this server has {sorted(PROFILES)}"
        )
    return dict(PROFILES[shape_id])


class JobRunner:
    def __init__(
        self,
        store: Store,
        data_dir: Path,
        runs: RunManager,
        max_concurrent: int = 1,
        metrics_poll_s: float = 0.5,  # how often a running job's metrics.jsonl is read
        allowed_roots: Iterable[Path] = (),  # folders TOML jobs may read (--allow-data-root)
    ) -> None:
        self.store = store
        self.files = FileStore(store, data_dir)
        self.access = DataAccess(resolved_roots(allowed_roots, data_dir), self.files)
        self.metrics_poll_s = metrics_poll_s
        self.dir = data_dir / "jobs"
        self.runs = runs
        self.max_concurrent = max(1, max_concurrent)
        self.workers: dict[str, JobProcess] = {}  # the TOML jobs running now, by id
        self.cancelling: set[str] = set()
        self._lock = threading.RLock()
        self._closing = False

    def start(self) -> None:
        for row in self.store.jobs(kind="toml", state="running"):
            self._set(row["id"], "interrupted")
            self.store.add_event(
                row["id"], "interrupted", "the server stopped while this job ran; resume it"
            )
        self._schedule()

    # ---- bookkeeping ------------------------------------------------------------------
    def get(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The job, if ``tenant`` (None: any) owns it; another tenant's is unknown."""
        row = self.store.job(job_id, tenant)
        if row is None:
            raise NotFound(f"unknown job {job_id!r}")
        return row

    def list(self, kind: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        return self.store.jobs(kind, tenant=tenant)

    def _set(self, job_id: str, state: str, **values: Any) -> None:
        self.store.update_job(job_id, state=state, updated=time.time(), **values)

    def _new(
        self,
        kind: str,
        name: str,
        state: str,
        config: dict[str, Any],
        tenant: str,
        job_id: str | None = None,
    ) -> dict:
        job_id = job_id or _new_job_id()
        self.store.add_job(job_id, kind, name, state, config, tenant)
        self.store.add_event(job_id, "created", f"{kind} job created")
        return self.get(job_id)

    # ---- trainer jobs -------------------------------------------------------------------
    def create_trainer(
        self,
        cfg: dict[str, Any],
        tenant: str = "default",
        job_id: str | None = None,
        profile: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A running trainer endpoint. ``job_id``: the client's choice (taken: ``JobExists``,
        whoever owns it: ids are one namespace); ``profile``: a training shape the caller
        resolved (else ``cfg['training_shape_ref']`` names one of ``PROFILES``).
        ``cfg['forward_only']`` marks a reference trainer; ``cfg['requested_base_model']``
        keeps the name the client sent when an alias or mapping changed it."""
        base, rank = cfg.get("base_model"), cfg.get("lora_rank", 16)
        if not isinstance(base, str) or not isinstance(rank, int) or rank < 0:
            raise BadRequest("trainer job needs base_model (str) and lora_rank (int >= 0)")
        engine_config(base, rank, None)  # the model must be servable here
        lr, gas = cfg.get("learning_rate", 1e-4), cfg.get("gradient_accumulation_steps", 1)
        if not isinstance(lr, int | float) or lr <= 0 or not isinstance(gas, int) or gas < 1:
            raise BadRequest("learning_rate must be > 0 and gradient_accumulation_steps >= 1")
        profile = profile or resolve_profile(cfg.get("training_shape_ref") or "default")
        name = str(cfg.get("display_name") or f"{base.split('/')[-1]}-r{rank}")[:200]
        config = {"base_model": base, "lora_rank": rank, "learning_rate": float(lr),
                  "gradient_accumulation_steps": gas, "display_name": name,
                  "training_shape_ref": cfg.get("training_shape_ref"), "profile": profile,
                  "forward_only": bool(cfg.get("forward_only")),
                  "requested_base_model": cfg.get("requested_base_model") or base}  # fmt: skip
        with self._lock:  # check and insert as one: two creates with one id make one job
            if job_id is not None and self.store.job(job_id) is not None:
                raise JobExists(f"job {job_id!r} already exists")
            return self._new("trainer", name, "running", config, tenant, job_id)

    def check_trainer_run(
        self, job_id: str, base_model: str, rank: int, tenant: str | None = None
    ) -> None:
        job = self.get(job_id, tenant)
        if job["kind"] != "trainer" or job["state"] != "running":
            raise NotFound(f"trainer job {job_id} is not running (state {job['state']})")
        cfg = job["config"]
        if not same_model(base_model, cfg["base_model"]) or rank != cfg["lora_rank"]:
            raise BadRequest(
                f"trainer job {job_id} trains {cfg['base_model']} with lora_rank "
                f"{cfg['lora_rank']}; this request asks for {base_model} with rank {rank}"
            )

    # ---- TOML jobs ----------------------------------------------------------------------
    def submit_toml(
        self,
        text: str,
        type_: str,
        overrides: builtins.list[str],  # `list` is a method here
        name: str | None,
        tenant: str = "default",
    ) -> dict[str, Any]:
        """Validate and confine the job (``job_access``), then queue it; a ``ConfigError``
        (every problem, by TOML key) leaves nothing behind."""
        if type_ not in ("sft", "dpo", "rl"):
            raise BadRequest(f"type must be sft, dpo or rl (got {type_!r})")
        if not all(isinstance(o, str) and "=" in o for o in overrides):
            raise BadRequest("overrides must be strings like section.key=value")
        job_id = _new_job_id()
        job_dir = self.dir / job_id
        job_dir.mkdir(parents=True)
        try:  # the job reads only ``tenant``'s uploads
            job, file_ids = validated_job(text, type_, overrides, job_dir, self.access, tenant)
            (job_dir / "config.toml").write_text(dump_toml(job))
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        # The worker runs config.toml, overrides applied: it gets none of its own.
        config = {"type": type_, "overrides": [], "submitted_overrides": overrides,
                  "files": file_ids}  # fmt: skip
        # "submitted" until its run_dir is set: the scheduler launches only queued jobs.
        self._new("toml", name or job.job.name or "job", "submitted", config, tenant, job_id)
        self._set(job_id, "queued", run_dir=str(job_dir / "run"))
        self._schedule()
        return self.get(job_id)

    def _schedule(self) -> None:
        with self._lock:
            if self._closing:
                return
            while len(self.workers) < self.max_concurrent:
                row = self.store.next_queued_job()
                if row is None:
                    return
                self._launch(row, resume=bool(row["config"].get("resume")))

    def _launch(self, job: dict[str, Any], resume: bool) -> None:
        job_id = job["id"]
        worker = JobProcess(job, self.dir / job_id, resume, self.store, self._set,
                            self._exited, self.metrics_poll_s)  # fmt: skip
        self.workers[job_id] = worker
        self._set(job_id, "running", error=None, exit_code=None)
        self.store.add_event(
            job_id,
            "running",
            f"worker process {worker.pid} started" + (" (resume)" if resume else ""),
        )
        worker.watch()

    def _exited(self, worker: JobProcess, code: int) -> None:
        """``worker`` exited (its last progress reported; this runs on its thread): free
        its slot, set the state its exit means, launch what is queued."""
        job_id = worker.job_id
        with self._lock:
            self.workers.pop(job_id, None)
            cancelled = job_id in self.cancelling
            self.cancelling.discard(job_id)
        if self._closing and not cancelled:
            self._set(job_id, "interrupted", exit_code=code)
            return
        if cancelled:
            self._set(job_id, "cancelled", exit_code=code)
            self.store.add_event(job_id, "cancelled", "cancelled")
        elif code == 0:
            worker.succeeded(self.get(job_id))
        else:
            worker.failed(code)
        self._schedule()

    def cancel(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        job = self.get(job_id, tenant)
        if job["kind"] == "trainer":  # a deleted one stays deleted
            return job if job["state"] == "deleted" else self._retire(job, "cancelled")
        with self._lock:
            worker = self.workers.get(job_id)
            if worker is not None:
                self.cancelling.add(job_id)
            elif job["state"] in ("queued", "interrupted"):
                self._set(job_id, "cancelled")
                self.store.add_event(job_id, "cancelled", "cancelled")
        if worker is not None:
            worker.stop()
        return self.get(job_id)

    def resume(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        job = self.get(job_id, tenant)
        if job["kind"] == "trainer" and job["state"] in ("running", "cancelled"):
            # A stopped endpoint serves again; its old runs stay unloaded (a client makes
            # new ones, or loads their checkpoints).
            if job["state"] == "cancelled":
                self._set(job_id, "running")
                self.store.add_event(job_id, "running", "resumed")
            return self.get(job_id)
        if job["kind"] != "toml" or job["state"] not in ("failed", "cancelled", "interrupted"):
            raise BadRequest(
                f"only a failed, cancelled or interrupted TOML job resumes (state {job['state']})"
            )
        gone = [f for f in job["config"].get("files", []) if self.store.file(f) is None]
        if gone:
            raise BadRequest(
                f"job {job_id} reads the upload(s) {', '.join(gone)}, deleted since: it cannot "
                "resume; submit it again with the data uploaded"
            )
        self.store.update_job(job_id, config={**job["config"], "resume": True})
        self._set(job_id, "queued")
        self.store.add_event(job_id, "queued", "resume requested")
        self._schedule()
        return self.get(job_id)

    def delete(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        job = self.get(job_id, tenant)
        if job_id in self.workers:
            self.cancel(job_id)
        return self._retire(job, "deleted")

    def _retire(self, job: dict[str, Any], state: str) -> dict[str, Any]:
        """Unload the job's runs (their memory is freed now) and mark it ``state``."""
        for run_id in self.store.job_run_ids(job["id"]):
            self.runs.unload(run_id)
        # Its runs stop serving; their checkpoints (and models promoted from them) stay.
        self.store.delete_job_runs(job["id"])
        self._set(job["id"], state)
        self.store.add_event(job["id"], state, state)
        return self.get(job["id"])

    # ---- models -------------------------------------------------------------------------
    def promote(
        self, job_id: str, checkpoint_id: str, output_model_id: str, tenant: str | None = None
    ) -> dict[str, Any]:
        """Promote a checkpoint of a job ``tenant`` (None: any) owns; the model is the job's
        owner's (an operator promoting for a tenant gives it to that tenant)."""
        job = self.get(job_id, tenant)
        catalog.check_new_model_id(self.store, output_model_id)
        if job["kind"] == "toml":
            path = Path(job["run_dir"]) / (checkpoint_id or "final")
            if checkpoint_id not in ("", "final") or not path.is_dir():
                raise NotFound(
                    f"job {job_id} has no checkpoint {checkpoint_id!r} (TOML jobs: 'final')"
                )
            base = tomllib.loads((self.dir / job_id / "config.toml").read_text())["job"]["model"]
        else:
            row = self._job_checkpoint(job_id, checkpoint_id)
            path = Path(row["path"])
            base = self.runs.base_model(row["run_id"])
        source = {"job_id": job_id, "checkpoint": checkpoint_id}
        return catalog.add_model(self.store, output_model_id, path, base, source, job["tenant"])

    def _job_checkpoint(self, job_id: str, checkpoint_id: str) -> dict[str, Any]:
        if is_tinker_path(checkpoint_id):
            row = self.runs.resolve_checkpoint(checkpoint_id, None, "sampler")
            owner = self.store.run(row["run_id"], include_deleted=True)
            if owner is None or owner["job_id"] != job_id:
                raise BadRequest(f"{checkpoint_id} does not belong to job {job_id}")
            return row
        name = checkpoint_name(checkpoint_id, "sampler")
        rows = self.store.job_checkpoints(job_id, "sampler", name)
        if not rows:
            raise NotFound(f"job {job_id} has no sampler checkpoint {checkpoint_id!r}")
        if len(rows) > 1:
            raise BadRequest(
                f"{len(rows)} runs of job {job_id} have {name!r}: pass its tinker:// path"
            )
        return rows[0]

    def close(self) -> None:
        with self._lock:
            self._closing = True
            workers = list(self.workers.items())
        for job_id, worker in workers:
            worker.stop()
            self.store.add_event(
                job_id, "interrupted", "the server stopped; resume the job to continue"
            )


def _new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"
