"""Training runs: one engine and one ordered worker each, persisted through the store.

Every engine call for a run happens on that run's worker thread, in submission order.
After a restart a run is known from the database only; its engine is rebuilt on the
first request, from its latest saved state (``save_state``), so nothing the client
saved is lost. A run that had trained but never saved cannot be rebuilt, and says so.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.server.inference import forward_all_positions
from vlmtune.server.store import Store
from vlmtune.server.validate import InputValidator
from vlmtune.server.wire import BadRequest, NotFound
from vlmtune.server.workers import SeqWorker
from vlmtune.types import AdamParams, Datum, ForwardBackwardOutput

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# EngineConfig fields a client may set when creating a run (device and mode are the server's).
CLIENT_ENGINE_KEYS = (
    "lora_alpha", "lora_dropout", "target_modules", "freeze_vision_tower", "freeze_projector",
    "min_pixels", "max_pixels", "max_images_per_message", "micro_batch_size", "packing",
    "max_row_tokens", "gradient_checkpointing", "seed", "precision",
)  # fmt: skip
# Config fields that must agree for one run to load another's saved state.
STATE_KEYS = ("base_model", "mode", "lora_rank", "lora_alpha", "target_modules",
              "freeze_vision_tower", "freeze_projector")  # fmt: skip


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"tinker://{run_id}/{'weights' if kind == 'training' else 'sampler_weights'}/{name}"


def model_pixels(config: EngineConfig) -> tuple[Path, int, int]:
    """(model directory, effective min_pixels, max_pixels): what the engine will use."""
    from vlmtune.models.loading import resolve_model_path
    from vlmtune.models.registry import UnknownModelError, get_model_spec, spec_from_dir

    path = resolve_model_path(config.base_model)
    try:
        spec = get_model_spec(config.base_model)
    except UnknownModelError:
        spec = spec_from_dir(path)
    lo = config.min_pixels if config.min_pixels is not None else spec.min_pixels
    hi = config.max_pixels if config.max_pixels is not None else spec.max_pixels
    return path, lo, hi


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

    @property
    def is_lora(self) -> bool:
        return self.config.mode != "full"


class RunManager:
    def __init__(self, store: Store, data_dir: Path, gap_timeout: float = 10.0) -> None:
        self.store = store
        self.gap_timeout = gap_timeout
        self.data_dir = data_dir
        self.runs: dict[str, Run] = {}
        self._validators: dict[tuple, InputValidator] = {}
        self._lock = threading.RLock()

    # ---- creation and lookup -----------------------------------------------------
    def engine_config(
        self, base_model: str, lora_rank: int, overrides: dict | None
    ) -> EngineConfig:
        from vlmtune.models.loading import ModelNotFoundError
        from vlmtune.models.registry import UnknownModelError

        unknown = sorted(set(overrides or {}) - set(CLIENT_ENGINE_KEYS))
        if unknown:
            raise BadRequest(
                f"engine: unknown settings {unknown} (allowed: {list(CLIENT_ENGINE_KEYS)})"
            )
        mode = "full" if lora_rank == 0 else "lora"
        config = EngineConfig(base_model=base_model, mode=mode, lora_rank=lora_rank or 16)
        for key, value in (overrides or {}).items():
            expected = type(getattr(config, key))
            if (
                value is not None
                and expected in (int, float, bool)
                and not isinstance(value, expected)
            ):
                raise BadRequest(f"engine.{key}: expected {expected.__name__}, got {value!r}")
            setattr(config, key, value)
        try:
            _, lo, hi = model_pixels(config)
        except (UnknownModelError, ModelNotFoundError, FileNotFoundError, ValueError) as e:
            raise BadRequest(f"base_model {base_model!r}: {e}") from None
        if not 0 < lo <= hi:
            raise BadRequest(f"engine: need 0 < min_pixels <= max_pixels (got {lo}, {hi})")
        return config

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
    ) -> tuple[Run, concurrent.futures.Future]:
        """A new run; the future resolves once its engine is built (idempotent by id)."""
        with self._lock:
            row = self.store.one("SELECT * FROM runs WHERE id = ?", (run_id,))
            if row is not None:
                if row["base_model"] != base_model or row["lora_rank"] != lora_rank:
                    raise BadRequest(f"model id {run_id} already exists with another configuration")
                run = self.get(run_id)
                return run, run.worker.submit(lambda: self.engine(run) and None)
            config = self.engine_config(base_model, lora_rank, overrides)
            run_dir = self.data_dir / "runs" / re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
            now = time.time()
            self.store.insert(
                "runs", id=run_id, session_id=session_id, job_id=job_id, base_model=base_model,
                lora_rank=lora_rank, config=asdict(config), dir=str(run_dir), created=now,
                last_request=now, user_metadata=user_metadata or {},
            )  # fmt: skip
            run = Run(run_id, config, run_dir, job_id, SeqWorker(run_id, 1, self.gap_timeout))
            self.runs[run_id] = run
        return run, run.worker.submit(lambda: self.engine(run) and None)

    def get(self, run_id: str) -> Run:
        with self._lock:
            run = self.runs.get(run_id)
            if run is not None:
                return run
            row = self.store.one("SELECT * FROM runs WHERE id = ? AND deleted = 0", (run_id,))
            if row is None:
                raise NotFound(f"unknown model id {run_id!r}")
            # Known from the database only (the server restarted): rebuilt lazily.
            run = Run(
                run_id, EngineConfig(**row["config"]), Path(row["dir"]), row["job_id"],
                SeqWorker(run_id, None, self.gap_timeout), restore=True,
            )  # fmt: skip
            self.runs[run_id] = run
            return run

    def engine(self, run: Run) -> TrainingEngine:
        """The run's engine (worker thread only): built, or rebuilt from its last state."""
        if run.engine is None:
            engine = TrainingEngine(run.config)
            if run.restore:
                states = self.store.checkpoints(run.id, "training")
                step = self.store.one("SELECT step FROM runs WHERE id = ?", (run.id,))["step"]
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

    def touch(self, run: Run, step: int | None = None) -> None:
        if step is None:
            self.store.update("runs", {"id": run.id}, last_request=time.time())
        else:
            self.store.update("runs", {"id": run.id}, last_request=time.time(), step=step)

    # ---- training primitives (each runs on the run's worker) ----------------------
    def forward_backward(
        self,
        run: Run,
        datums: list[Datum],
        loss_fn: str,
        config: dict,
        forward_only: bool,
        seq: int | None,
    ) -> concurrent.futures.Future:
        def task() -> ForwardBackwardOutput:
            engine = self.engine(run)
            if forward_only:
                return forward_all_positions(engine, datums, loss_fn, config)
            saved = [None if p.grad is None else p.grad.clone() for p in engine.trainable_params]
            try:
                return engine.forward_backward(datums, loss_fn, config)
            except BaseException:
                # Put back exactly the gradients accumulated before this call.
                for p, g in zip(engine.trainable_params, saved, strict=True):
                    p.grad = g
                raise

        return run.worker.submit(task, seq)

    def optim_step(
        self, run: Run, params: AdamParams, seq: int | None
    ) -> concurrent.futures.Future:
        def task() -> dict[str, Any]:
            engine = self.engine(run)
            out = engine.optim_step(params)
            run.version += 1
            self.touch(run, engine.step)
            return {"metrics": {**out.metrics, "step": float(engine.step)}}

        return run.worker.submit(task, seq)

    def save_state(
        self,
        run: Run,
        name: str,
        overwrite: bool,
        extra: dict | None,
        meta: dict | None,
        seq: int | None,
    ) -> concurrent.futures.Future:
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
            self.touch(run, engine.step)
            return {"type": "save_weights", "path": tinker_path(run.id, "training", name)}

        return run.worker.submit(task, seq)

    def load_state(
        self, run: Run, ref: str, optimizer: bool, seq: int | None
    ) -> concurrent.futures.Future:
        row = self.resolve_checkpoint(ref, run, "training")
        self.check_compatible(run.config, Path(row["path"]))

        def task() -> dict[str, Any]:
            engine = self.engine(run)
            extra = engine.load_state(row["path"])
            if not optimizer:
                engine.optimizer = None
            run.version += 1
            self.touch(run, engine.step)
            path = tinker_path(row["run_id"], "training", row["name"])
            return {
                "type": "load_weights",
                "path": path,
                "model_id": run.id,
                "extra": extra,
                "step": engine.step,
            }

        return run.worker.submit(task, seq)

    def save_for_sampler(
        self, run: Run, name: str, checkpoint_type: str, seq: int | None
    ) -> concurrent.futures.Future:
        check_name(name)
        path = run.dir / "sampler_weights" / name

        def task() -> dict[str, Any]:
            engine = self.engine(run)
            if checkpoint_type == "merged" and run.is_lora:
                from vlmtune.models.loading import merge_adapter_to_dir

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
            )
            return {
                "type": "save_weights_for_sampler",
                "path": tinker_path(run.id, "sampler", name),
                "name": name,
            }

        return run.worker.submit(task, seq)

    # ---- checkpoints ----------------------------------------------------------------
    def resolve_checkpoint(self, ref: str, run: Run | None = None, kind: str = "training") -> dict:
        """A checkpoint row from ``tinker://run/weights/name``, a bare name, or a path ending in one."""
        if ref.startswith("tinker://"):
            parts = ref[len("tinker://") :].split("/")
            if len(parts) != 3 or parts[1] not in ("weights", "sampler_weights"):
                raise BadRequest(
                    f"malformed checkpoint path {ref!r} (tinker://<run>/weights/<name>)"
                )
            run_id, kind, name = (
                parts[0],
                "training" if parts[1] == "weights" else "sampler",
                parts[2],
            )
        elif run is not None:
            run_id, name = run.id, Path(ref).name
        else:
            raise BadRequest(
                f"checkpoint {ref!r}: expected tinker://<run>/<weights|sampler_weights>/<name>"
            )
        row = self.store.one(
            "SELECT * FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ?",
            (run_id, kind, name),
        )
        if row is None or not Path(row["path"]).exists():
            raise NotFound(f"no {kind} checkpoint {name!r} in run {run_id!r}")
        return row

    def check_compatible(self, config: EngineConfig, state_dir: Path) -> None:
        saved = json.loads((state_dir / "state.json").read_text())["engine"]
        mine = asdict(config)
        diff = [k for k in STATE_KEYS if saved.get(k) != mine.get(k)]
        if diff:
            raise BadRequest(
                "checkpoint was saved by a run with different "
                + ", ".join(f"{k} ({saved.get(k)!r} vs {mine.get(k)!r})" for k in diff)
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


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or ".." in name:
        raise BadRequest(f"checkpoint name {name!r}: use 1-128 of A-Z a-z 0-9 . _ - (no slashes)")
