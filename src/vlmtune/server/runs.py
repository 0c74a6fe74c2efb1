"""Training runs: one engine and one ordered worker each, persisted through the store.

Every engine call for a run happens on that run's worker thread, in submission order:
``submit`` is the one way in, and owns that order and idempotency (a retried request
is answered with the first one's future). A primitive here only checks its request
and returns the task the worker will run.
After a restart a run is known from the database only; its engine is rebuilt on the
first request, from its latest saved state (``save_state``), so nothing the client
saved is lost. A run that had trained but never saved cannot be rebuilt, and says so.
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmtune.engine import losses
from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.protocol.errors import BadRequest, NotFound
from vlmtune.protocol.paths import tinker_path
from vlmtune.server.inference import forward_all_positions
from vlmtune.server.run_checkpoints import find_checkpoint
from vlmtune.server.run_config import check_compatible, check_name, engine_config, model_pixels
from vlmtune.server.run_metrics import RunMetrics
from vlmtune.server.store import Store
from vlmtune.server.validate import InputValidator
from vlmtune.server.workers import FutureRegistry, SeqWorker
from vlmtune.types import AdamParams, Datum, ForwardBackwardOutput

OPTIM_STEP_METRIC = "vlmtune/step"  # optim_step's metric: the run's optimizer steps so far
SEEN_PER_RUN = 4096  # seq_ids remembered per run for answering retries
Task = Callable[[], Any]  # what a run's worker runs
# A run id's middle segment: a trainable run, or a frozen reference (create_model with
# base_only, or any run of a forward-only trainer job). In the id so that it survives a
# restart with the run.
TRAIN_SEGMENT, REFERENCE_SEGMENT = "train", "reference"


def run_id_for(session_id: str, model_seq_id: int, base_only: bool = False) -> str:
    segment = REFERENCE_SEGMENT if base_only else TRAIN_SEGMENT
    return f"{session_id}:{segment}:{model_seq_id}"


def is_reference_id(run_id: str) -> bool:
    return f":{REFERENCE_SEGMENT}:" in run_id


@dataclass
class Run:
    id: str
    config: EngineConfig
    dir: Path
    job_id: str | None
    worker: SeqWorker
    restore: bool = False
    engine: TrainingEngine | None = None
    version: int = 0  # bumped whenever the weights change
    snapshots: OrderedDict[str, tuple[int, dict[str, torch.Tensor]]] = field(
        default_factory=OrderedDict
    )
    seen: OrderedDict[int, str] = field(default_factory=OrderedDict)  # seq_id -> request_id
    tenant: str = "default"  # who owns the run (and its checkpoints, futures, samplers)
    # Positions with a non-zero loss input, and data with any, since the last optim_step:
    # what ``grad_accumulation_normalization`` divides the gradients by.
    loss_tokens: int = 0
    loss_sequences: int = 0
    # metrics.jsonl in ``dir``: a record per optim_step, for the run's report page
    recorder: RunMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.recorder = RunMetrics(self.dir, self.id)

    @property
    def is_lora(self) -> bool:
        return self.config.mode != "full"

    @property
    def base_only(self) -> bool:
        """A frozen reference: forward passes only, nothing trains (its engine is built as
        any other, so that it can load a saved state; with no backward pass it never
        holds gradients)."""
        return is_reference_id(self.id)

    def check_trains(self, op: str) -> None:
        if self.base_only:
            job = f" of trainer job {self.job_id}" if self.job_id else ""
            raise BadRequest(
                f"{op}: model {self.id}{job} is a frozen reference model (create_model with "
                "base_only=true, or a forward-only trainer job): it serves forward only"
            )


def loss_counts(datums: list[Datum], loss_fn: str) -> tuple[int, int]:
    """(positions whose loss input is non-zero, data with any): the gradient's support,
    as ``grad_accumulation_normalization`` counts it."""
    key = losses.loss_spec(loss_fn).positions
    per_datum = [sum(1 for v in d.loss_fn_inputs[key].data if v != 0) for d in datums]
    return sum(per_datum), sum(1 for k in per_datum if k)


class RunManager:
    def __init__(
        self, store: Store, data_dir: Path, futures: FutureRegistry, gap_timeout: float = 10.0
    ) -> None:
        self.store = store
        self.futures = futures
        self.gap_timeout = gap_timeout
        self.data_dir = data_dir
        self.runs: dict[str, Run] = {}
        self._validators: dict[tuple, InputValidator] = {}
        self._lock = threading.RLock()

    # ---- the one way in -----------------------------------------------------------
    def submit(self, run: Run, seq: int | None, kind: str, prepare: Callable[[], Task]) -> str:
        """Queue a request on ``run``'s worker in ``seq`` order; return its request id.

        ``prepare`` checks the request (raising ``BadRequest`` or ``NotFound``) and
        returns the task to run. A client that lost the response to a POST sends it
        again with the same ``seq``: it gets the first request's id, and nothing runs
        twice. A request that fails its checks tells the worker not to wait for ``seq``.
        """
        with self._lock:
            if seq is not None and seq in run.seen:
                return run.seen[seq]
        try:
            task = prepare()
        except Exception:
            run.worker.skip(seq)
            raise
        request_id = self.futures.add(run.worker.submit(task, seq), kind, run.id, run.tenant)
        if seq is not None:
            with self._lock:
                run.seen[seq] = request_id
                while len(run.seen) > SEEN_PER_RUN:
                    run.seen.popitem(last=False)
        return request_id

    # ---- creation and lookup -----------------------------------------------------
    def create(
        self,
        run_id: str,
        base_model: str,
        lora_rank: int,
        overrides: dict | None = None,
        *,
        session_id: str | None = None,
        job_id: str | None = None,
        user_metadata: dict | None = None,
        tenant: str = "default",
    ) -> Run:
        """A new run owned by ``tenant``, or the existing one of that id if it has the same
        model, rank and owner (the caller checked it may use the session in the id)."""
        with self._lock:
            row = self.store.run(run_id, include_deleted=True)
            if row is not None:
                if (row["base_model"], row["lora_rank"], row["tenant"]) != (
                    base_model, lora_rank, tenant
                ):  # fmt: skip
                    raise BadRequest(f"model id {run_id} already exists with another configuration")
                return self.get(run_id)
            config = engine_config(base_model, lora_rank, overrides)
            run_dir = self.data_dir / "runs" / re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
            self.store.add_run(
                run_id, session_id=session_id, job_id=job_id, base_model=base_model,
                lora_rank=lora_rank, config=asdict(config), run_dir=str(run_dir),
                user_metadata=user_metadata, tenant=tenant,
            )  # fmt: skip
            worker = SeqWorker(run_id, 1, self.gap_timeout)
            run = Run(run_id, config, run_dir, job_id, worker, tenant=tenant)
            self.runs[run_id] = run
            return run

    def base_model(self, run_id: str) -> str:
        """The base model of a run, deleted or not (its checkpoints outlive it)."""
        row = self.store.run(run_id, include_deleted=True)
        if row is None:
            raise NotFound(f"unknown training run {run_id!r}")
        return str(row["base_model"])

    def build(self, run: Run) -> Task:
        """The task that builds the run's engine (``create_model``'s result)."""
        return lambda: self.engine(run) and None

    def get(self, run_id: str, tenant: str | None = None) -> Run:
        """The run, if ``tenant`` (None: any) owns it; another tenant's is unknown."""
        with self._lock:
            run = self.runs.get(run_id)
            if run is not None and tenant in (None, run.tenant):
                return run
            row = None if run is not None else self.store.run(run_id, tenant=tenant)
            if row is None:
                raise NotFound(f"unknown model id {run_id!r}")
            # Known from the database only (the server restarted): rebuilt lazily.
            run = Run(
                run_id, EngineConfig(**row["config"]), Path(row["dir"]), row["job_id"],
                SeqWorker(run_id, None, self.gap_timeout), restore=True, tenant=row["tenant"],
            )  # fmt: skip
            self.runs[run_id] = run
            return run

    def engine(self, run: Run) -> TrainingEngine:
        """The run's engine (worker thread only): built, or rebuilt from its last state."""
        if run.engine is None:
            engine = TrainingEngine(run.config)
            if run.restore:
                states = self.store.checkpoints(run.id, "training")
                step = self.step(run)
                if states:
                    engine.load_state(states[-1]["path"])
                elif step > 0:
                    raise RuntimeError(
                        f"run {run.id} trained {step} steps but never saved its state, and the "
                        "server restarted: its weights are gone (save_state regularly)"
                    )
            run.engine = engine
        return run.engine

    def validator(self, config: EngineConfig) -> InputValidator:
        path, lo, hi = model_pixels(config)
        key = (str(path), lo, hi)
        with self._lock:
            if key not in self._validators:
                self._validators[key] = InputValidator(path, lo, hi)
            return self._validators[key]

    def step(self, run: Run) -> int:
        """Optimizer steps taken: the engine's, or the stored count before it is rebuilt."""
        if run.engine is not None:
            return run.engine.step
        if run.restore:
            # After a restart the engine rebuilds from its newest saved state: that state's
            # step, not the last optimizer step the database saw before the crash.
            states = self.store.checkpoints(run.id, "training")
            if states:
                return int(states[-1]["step"])
        row = self.store.run(run.id, include_deleted=True)
        return row["step"] if row else 0

    # ---- training primitives: each checks its request, returns the worker's task -----
    def forward_backward(
        self, run: Run, datums: list[Datum], loss_fn: str, config: dict, forward_only: bool
    ) -> Task:
        if not forward_only:
            run.check_trains("forward_backward")
        tokens, sequences = loss_counts(datums, loss_fn)

        def task() -> ForwardBackwardOutput:
            engine = self.engine(run)
            if forward_only:
                return forward_all_positions(engine, datums, loss_fn, config)
            saved = [None if p.grad is None else p.grad.clone() for p in engine.trainable_params]
            try:
                out = engine.forward_backward(datums, loss_fn, config)
            except BaseException:
                # Put back exactly the gradients accumulated before this call.
                for p, g in zip(engine.trainable_params, saved, strict=True):
                    p.grad = g
                raise
            run.loss_tokens += tokens
            run.loss_sequences += sequences
            run.recorder.forward_backward(datums, out.metrics)
            return out

        return task

    def forward_reference(self, run: Run, datums: list[Datum], loss_fn: str, config: dict) -> Task:
        """``forward`` under the base model (vlmtune's extension; the in-process values)."""
        if run.base_only:  # the run is the base model: no second copy
            return lambda: self.engine(run).forward(datums, loss_fn, config)
        return lambda: self.engine(run).reference_forward(datums, loss_fn, config)

    def optim_step(self, run: Run, params: AdamParams, normalization: str | None = None) -> Task:
        """``normalization``: ``num_loss_tokens`` or ``num_sequences`` divides the
        accumulated gradients by that count (since the last step) before clipping and the
        step, so a loss summed over tokens or data becomes their mean."""
        run.check_trains("optim_step")

        def task() -> dict[str, Any]:
            engine = self.engine(run)
            divisor = {"num_loss_tokens": run.loss_tokens, "num_sequences": run.loss_sequences}
            count = divisor.get(normalization or "none", 0)
            if count > 1:
                for p in engine.trainable_params:
                    if p.grad is not None:
                        p.grad.div_(count)
            run.loss_tokens = run.loss_sequences = 0
            out = engine.optim_step(params)
            run.version += 1
            self.store.touch_run(run.id, engine.step)
            run.recorder.optim_step(engine.step, params, out.metrics)
            # Namespaced: a client's loop merges these into its own metrics, where a plain
            # "step" would overwrite its step counter (tinker-cookbook's does).
            return {"metrics": {**out.metrics, OPTIM_STEP_METRIC: engine.step}}

        return task

    def save_state(
        self, run: Run, name: str, overwrite: bool, extra: dict | None, meta: dict | None
    ) -> Task:
        check_name(name)
        path = run.dir / "weights" / name
        if path.exists() and not overwrite:
            raise BadRequest(f"checkpoint {name!r} already exists (pass overwrite=true)")

        def task() -> dict[str, Any]:
            engine = self.engine(run)
            engine.save_state(path, extra)
            self.store.add_checkpoint(
                run.id, "training", name, str(path), step=engine.step, user_metadata=meta
            )
            self.store.touch_run(run.id, engine.step)
            return {"type": "save_weights", "path": tinker_path(run.id, "training", name)}

        return task

    def load_state(self, run: Run, ref: str, optimizer: bool, tenant: str | None = None) -> Task:
        row = self.resolve_checkpoint(ref, run, "training", tenant)
        check_compatible(run.config, Path(row["path"]))

        def task() -> dict[str, Any]:
            engine = self.engine(run)
            extra = engine.load_state(row["path"])
            if not optimizer:
                engine.optimizer = None
            run.version += 1
            self.store.touch_run(run.id, engine.step)
            path = tinker_path(row["run_id"], "training", row["name"])
            return {
                "type": "load_weights",
                "path": path,
                "model_id": run.id,
                "extra": extra,
                "step": engine.step,
            }

        return task

    def save_for_sampler(
        self, run: Run, name: str, checkpoint_type: str, meta: dict | None = None
    ) -> Task:
        """Write ``name`` as ``checkpoint_type``: ``base``, the adapter or full model as
        the run trains, or ``merged``, a LoRA folded into its base (``SaveSamplerBody``
        maps the clients' other names onto these)."""
        check_name(name)
        path = run.dir / "sampler_weights" / name

        def task() -> dict[str, Any]:
            engine = self.engine(run)
            if checkpoint_type == "merged" and run.is_lora:
                from vlmtune.models.saving import merge_adapter_to_dir

                run.dir.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=run.dir) as tmp:
                    engine.save_weights_for_sampler(Path(tmp) / "adapter")
                    merge_adapter_to_dir(Path(tmp) / "adapter", path)
            else:
                engine.save_weights_for_sampler(path)
            self.store.add_checkpoint(
                run.id,
                "sampler",
                name,
                str(path),
                checkpoint_type=checkpoint_type,
                step=engine.step,
                user_metadata=meta,
            )
            return {
                "type": "save_weights_for_sampler",
                "path": tinker_path(run.id, "sampler", name),
                "name": name,
            }

        return task

    # ---- checkpoints ----------------------------------------------------------------
    def resolve_checkpoint(
        self,
        ref: str,
        run: Run | None = None,
        kind: str = "training",
        tenant: str | None = None,
        job_id: str | None = None,
    ) -> dict:
        """The checkpoint ``ref`` names (``run_checkpoints.find_checkpoint``), seen from
        ``run`` and its trainer job (or ``job_id``) by ``tenant`` (None: any)."""
        job_id = job_id or (run.job_id if run is not None else None)
        return find_checkpoint(
            self.store, ref, run.id if run is not None else None, job_id, kind, tenant
        )

    def close(self) -> None:
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            run.worker.close()

    def unload(self, run_id: str) -> None:
        with self._lock:
            run = self.runs.pop(run_id, None)
        if run is not None:
            run.worker.close(wait=False)
