"""Sampling sessions: what a ``sampling_session_id`` samples from.

``live``: a training run's current weights (Tinker's ``inflight``), on the run's worker.
``snapshot``: a run's weights at the moment of saving (Tinker's default for
``save_weights_and_get_sampling_client``): a copy of the trainable tensors is kept in
memory and swapped in for each call, so training may go on in between.
``path``: a saved sampler checkpoint; ``base``: a base model. Both are served by the
``ModelPool`` of inference engines and survive restarts (their rows are in the store).
"""

from __future__ import annotations

import concurrent.futures
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.engine.inference import load_inference_engine
from vlmtune.protocol.errors import BadRequest, NotFound
from vlmtune.server.inference import ModelPool, sample
from vlmtune.server.run_config import engine_config
from vlmtune.server.runs import Run, RunManager, Task
from vlmtune.server.store import Store
from vlmtune.server.validate import InputValidator
from vlmtune.types import ModelInput, SampleResponse, SamplingParams

MAX_SNAPSHOTS = 4  # per run: each holds a copy of the trainable weights


@dataclass
class Sampler:
    id: str
    kind: str  # live | snapshot | path | base
    base_model: str
    run_id: str | None = None
    path: str | None = None
    tenant: str = "default"  # who owns the session (a run's sessions: the run's owner)


class SamplerManager:
    def __init__(self, store: Store, runs: RunManager, pool: ModelPool) -> None:
        self.store = store
        self.runs = runs
        self.pool = pool
        self.samplers: dict[str, Sampler] = {}
        self._lock = threading.Lock()

    def from_run(self, run: Run, kind: str) -> Task:
        """The task making a session over a run's weights: ``inflight`` (live) or
        ``snapshot`` (frozen when the task runs, in order with the run's training)."""
        sid = f"samp-{uuid.uuid4().hex[:16]}"
        live = kind == "inflight"
        session_kind = "live" if live else "snapshot"
        sampler = Sampler(sid, session_kind, run.config.base_model, run.id, tenant=run.tenant)

        def task() -> dict[str, Any]:
            engine = self.runs.engine(run)
            if not live:
                params = engine.model.named_parameters()
                weights = {n: p.detach().clone() for n, p in params if p.requires_grad}
                run.snapshots[sid] = (run.version, weights)
                while len(run.snapshots) > MAX_SNAPSHOTS:
                    run.snapshots.popitem(last=False)
            with self._lock:
                self.samplers[sid] = sampler
            return {"type": "save_weights_for_sampler", "sampling_session_id": sid}

        return task

    def create(
        self,
        model_path: str | None,
        base_model: str | None,
        tenant: str = "default",
        sees: str | None = None,
    ) -> Sampler:
        """A session owned by ``tenant`` over a checkpoint that ``sees`` (None: any tenant)
        owns, or over a base model."""
        sid = f"samp-{uuid.uuid4().hex[:16]}"
        if model_path:
            row = self.runs.resolve_checkpoint(model_path, None, "sampler", sees)
            base = self.runs.base_model(row["run_id"])
            sampler = Sampler(sid, "path", base, row["run_id"], row["path"], tenant)
        elif base_model:
            engine_config(base_model, 0, None)  # validates the name
            sampler = Sampler(sid, "base", base_model, tenant=tenant)
        else:
            raise BadRequest("give model_path or base_model")
        self.store.add_sampling_session(
            sid, sampler.kind, sampler.run_id, sampler.path, sampler.base_model, tenant
        )
        with self._lock:
            self.samplers[sid] = sampler
        return sampler

    def get(self, sid: str, tenant: str | None = None) -> Sampler:
        """The session, if ``tenant`` (None: any) owns it; another tenant's is unknown."""
        with self._lock:
            sampler = self.samplers.get(sid)
        if sampler is not None and tenant in (None, sampler.tenant):
            return sampler
        row = None if sampler is not None else self.store.sampling_session(sid, tenant)
        if row is None:
            raise NotFound(f"unknown sampling session {sid!r} (snapshots do not survive a restart)")
        sampler = Sampler(
            row["id"], row["kind"], row["base_model"], row["run_id"], row["path"], row["tenant"]
        )
        with self._lock:
            self.samplers[sid] = sampler
        return sampler

    def validator(self, sampler: Sampler) -> InputValidator:
        if sampler.run_id is not None:
            # The run's stored config: a checkpoint outlives its run (a deleted trainer
            # job's checkpoints still serve), and the config says its pixel limits.
            row = self.store.run(sampler.run_id, include_deleted=True)
            if row is None:
                raise NotFound(f"unknown training run {sampler.run_id!r}")
            return self.runs.validator(EngineConfig(**row["config"]))
        return self.runs.validator(engine_config(sampler.base_model, 0, None))

    def pool_engine(self, sampler: Sampler) -> tuple[str, Callable[[], TrainingEngine]]:
        """(``ModelPool`` key, loader) of a ``path`` or ``base`` session's engine; a
        deployment's hot-loaded checkpoint is served by the same engine."""
        key = sampler.path or sampler.base_model
        return key, lambda: load_inference_engine(key, sampler.base_model)

    def sample(
        self,
        sampler: Sampler,
        prompt: ModelInput,
        n: int,
        params: SamplingParams,
        lps: bool,
        last_n: int | None,
    ) -> concurrent.futures.Future:
        if sampler.kind in ("path", "base"):
            key, loader = self.pool_engine(sampler)
            return self.pool.run(
                key,
                loader,
                lambda e: sample(e, prompt, n, params, lps, last_n),
            )
        run = self.runs.get(sampler.run_id or "")

        def task() -> SampleResponse:
            engine = self.runs.engine(run)
            if sampler.kind == "live":
                return sample(engine, prompt, n, params, lps, last_n)
            if sampler.id not in run.snapshots:
                raise BadRequest("this sampling snapshot expired; save weights for a sampler again")
            version, weights = run.snapshots[sampler.id]
            if version == run.version:  # nothing changed since the snapshot
                return sample(engine, prompt, n, params, lps, last_n)
            by_name = dict(engine.model.named_parameters())
            current = {k: by_name[k].detach().clone() for k in weights}
            try:
                with torch.no_grad():
                    for k, w in weights.items():
                        by_name[k].copy_(w)
                return sample(engine, prompt, n, params, lps, last_n)
            finally:
                with torch.no_grad():
                    for k, w in current.items():
                        by_name[k].copy_(w)

        return run.worker.submit(task)
