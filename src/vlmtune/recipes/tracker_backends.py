"""The trackers ``[logging] report_to`` can name, each behind the same four calls
(``begin``, ``log``, ``close``, ``state``) and started by ``start(info)``, which raises
a ``TrackerError`` saying why it cannot. ``trackers.py`` runs them for a run."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Protocol

from vlmtune.config import LoggingConfig


class TrackerError(Exception):
    """A tracker could not start; the message says why and what to do."""


@dataclass(frozen=True)
class RunInfo:
    """What every tracker starts from."""

    logging: LoggingConfig
    run_dir: Path
    project: str
    run_name: str
    config: dict[str, Any]  # the job as it runs (config.toml's content)
    config_toml: str
    resumed: bool  # a checkpoint is loaded: continue the tracker's run
    saved: dict[str, Any] = field(default_factory=dict)  # this tracker's trackers.json entry


class Tracker(Protocol):
    name: ClassVar[str]

    def begin(self, start_step: int) -> None: ...
    def log(self, scalars: dict[str, float], step: int) -> None: ...
    def close(self, ok: bool) -> None: ...
    def state(self) -> dict[str, Any]: ...


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"hyperparameters.learning_rate": "0.0001", ...}``: a nested config as MLflow's
    flat string params (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def import_tracker(module: str, extra: str) -> ModuleType:
    """``module``, or a ``TrackerError`` that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if isinstance(e, ModuleNotFoundError) and missing and missing.split(".")[0] == module:
            raise TrackerError(
                f"the {module} package is not installed (pip install 'vlmtune[{extra}]')"
            ) from None
        raise TrackerError(
            f"importing {module} failed ({e}); reinstall it: pip install 'vlmtune[{extra}]'"
        ) from None


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    # W&B and trackio print banners on stdout, where `vlmtune train` prints only the
    # summary JSON: they go to stderr with the rest of the log.
    with contextlib.redirect_stdout(sys.stderr):
        yield


class TensorBoard:
    name: ClassVar[str] = "tensorboard"

    def __init__(self, folder: Path, resumed: bool, config_toml: str) -> None:
        self.folder, self.resumed, self.config_toml = folder, resumed, config_toml
        self.writer: Any = None

    @classmethod
    def start(cls, info: RunInfo) -> TensorBoard:
        import_tracker("tensorboard", "tensorboard")
        import_tracker("torch.utils.tensorboard", "tensorboard")  # torch's writer
        folder = Path(info.logging.log_dir or info.run_dir / "tensorboard").expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackerError(
                f"cannot write {folder} ({e.strerror or e}): set logging.log_dir"
            ) from None
        return cls(folder, info.resumed, info.config_toml)

    def begin(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # The reader drops events at or after a restart's purge step from older files:
        # resumed, those past the checkpoint (as metrics.jsonl is cut); fresh, all.
        purge = start_step + 1 if self.resumed else 0
        if self.writer is not None:  # a second metrics log of the same run
            self.writer.close()
        self.writer = SummaryWriter(str(self.folder), purge_step=purge, flush_secs=10)
        # Indented: TensorBoard's text tab renders Markdown, and this keeps it verbatim.
        text = "\n".join(f"    {line}" for line in self.config_toml.splitlines())
        self.writer.add_text("config", text, start_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            raise RuntimeError("logged before the run began")
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self, ok: bool) -> None:
        if self.writer is not None:
            self.writer.close()

    def state(self) -> dict[str, Any]:
        return {"log_dir": str(self.folder)}


class WandB:
    name: ClassVar[str] = "wandb"

    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def start(cls, info: RunInfo) -> WandB:
        wandb = import_tracker("wandb", "wandb")
        mode = info.logging.wandb_mode or os.environ.get("WANDB_MODE") or "online"
        # Checked first: wandb.init would ask for a key on a terminal (or fail off one).
        if mode == "online" and wandb.run is None and not wandb.login(prompt=False, verify=False):
            raise TrackerError(
                "no W&B API key: run `wandb login` or set WANDB_API_KEY, or log offline "
                '(logging.wandb_mode = "offline", then `wandb sync`)'
            )
        run_id = info.saved.get("id") if info.resumed else None
        try:
            run = cls._init(wandb, info, run_id)
        except Exception as e:  # a server that cannot be reached, a project name refused
            raise TrackerError(f"{type(e).__name__}: {e}") from None
        # Plotted against the training step, so an eval at a step lands on it.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return cls(run)

    @staticmethod
    def _init(wandb: ModuleType, info: RunInfo, run_id: str | None) -> Any:
        with _quiet_stdout():
            return wandb.init(
                project=info.project,
                name=info.run_name,
                tags=info.logging.tags or None,
                config=info.config,
                # WANDB_DIR when set (wandb's own setting), else the run directory
                dir=None if os.environ.get("WANDB_DIR") else str(info.run_dir),
                mode=info.logging.wandb_mode,  # None: WANDB_MODE, else online
                id=run_id,
                resume="allow" if run_id else None,
                reinit="create_new",  # a second run in one process (a notebook) is its own
            )

    def begin(self, start_step: int) -> None:
        pass

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({**scalars, "step": step})

    def close(self, ok: bool) -> None:
        with _quiet_stdout():
            self.run.finish(exit_code=0 if ok else 1)

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id}


class MLflow:
    name: ClassVar[str] = "mlflow"
    BATCH = 100  # MLflow takes at most 100 params in one log_batch

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri

    @staticmethod
    def tracking_uri(info: RunInfo) -> tuple[str, Path | None]:
        """(the URI, the artifact folder when it is the run directory's own store)."""
        given = info.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if given:
            return given, None
        # MLflow 3 refuses its plain-folder store; SQLite is its local default.
        return f"sqlite:///{info.run_dir.resolve() / 'mlflow.db'}", info.run_dir / "mlartifacts"

    @classmethod
    def start(cls, info: RunInfo) -> MLflow:
        import_tracker("mlflow", "mlflow")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri, artifacts = cls.tracking_uri(info)
        try:
            client = MlflowClient(tracking_uri=uri)
            run_id = info.saved.get("run_id") if info.saved.get("tracking_uri") == uri else None
            if info.resumed and run_id:
                client.update_run(run_id, status="RUNNING")
                logged = set(client.get_run(run_id).data.params)
            else:
                run_id, logged = cls._new_run(client, info, artifacts), set()
            # MLflow refuses to change a param: a resumed run keeps its first values.
            params = [Param(k, v[:6000]) for k, v in flat_params(info.config).items()]
            params = [p for p in params if p.key not in logged]
            for i in range(0, len(params), cls.BATCH):
                client.log_batch(run_id, params=params[i : i + cls.BATCH])
        except Exception as e:  # MLflow raises many kinds: a bad URI, a refused server
            raise TrackerError(f"{uri}: {type(e).__name__}: {e}") from None
        return cls(client, run_id, uri)

    @staticmethod
    def _new_run(client: Any, info: RunInfo, artifacts: Path | None) -> str:
        experiment = client.get_experiment_by_name(info.project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            where = artifacts.resolve().as_uri() if artifacts is not None else None
            experiment_id = client.create_experiment(info.project, artifact_location=where)
        tags = {tag: "" for tag in info.logging.tags}
        return client.create_run(experiment_id, run_name=info.run_name, tags=tags).info.run_id

    def begin(self, start_step: int) -> None:
        pass

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}


class Trackio:
    name: ClassVar[str] = "trackio"

    def __init__(self, trackio: ModuleType, run: Any) -> None:
        self.trackio, self.run = trackio, run

    @classmethod
    def start(cls, info: RunInfo) -> Trackio:
        trackio = import_tracker("trackio", "trackio")
        try:
            with _quiet_stdout():
                run = trackio.init(
                    project=info.project,
                    name=info.run_name,
                    config=info.config,
                    resume="allow" if info.resumed else "never",  # trackio resumes by name
                    embed=False,  # no dashboard server from a training run
                )
        except Exception as e:  # a project name it refuses, an unwritable TRACKIO_DIR
            raise TrackerError(f"{type(e).__name__}: {e}") from None
        return cls(trackio, run)

    def begin(self, start_step: int) -> None:
        pass

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, ok: bool) -> None:
        with _quiet_stdout():
            if self.trackio.context_vars.current_run.get() is self.run:
                self.trackio.finish()  # also forgets it: no second finish at exit
            else:
                self.run.finish()

    def state(self) -> dict[str, Any]:
        return {"name": self.run.name}


# name -> the class whose ``start(info)`` starts it; and the module that is its package
BACKENDS: dict[str, Any] = {t.name: t for t in (TensorBoard, WandB, MLflow, Trackio)}
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
