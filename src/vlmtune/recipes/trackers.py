"""Experiment trackers: what ``metrics.jsonl`` holds, sent as it is written to the
trackers ``[logging] report_to`` names (TensorBoard, W&B, MLflow, trackio, each an
optional extra of the same name; one class each in ``tracker_backends.py``).

    start_trackers(job, run_dir, resumed, log)   every tracker starts, or a ConfigError
    Trackers.begin(start_step)                   the loop's first step is known
    Trackers.log(record)                         each metrics.jsonl record (MetricsLog)
    Trackers.close(ok)                           the run's end (``Checkpointer.finish``)

Each tracker gets every number of every record at the record's ``step`` under the
record's own names (``loss``, ``eval/accuracy``...; ``step`` is the x axis and the
constant ``total_steps`` is left out; a NaN, written as null in metrics.jsonl, is
left out too), and the job as it ran (``config.toml`` as a dict: W&B and trackio
config, MLflow params, TensorBoard text). Only the main process starts trackers
(``RunDir`` does not start them elsewhere), so a torchrun job logs once.

Failures. A tracker that cannot start (its package missing, no W&B key online, an
MLflow store it cannot open) is a ``ConfigError`` naming ``logging.report_to`` and
the tracker, raised by ``prepare`` before the model loads; ``vlmtune train`` exits 2.
A tracker that fails mid-run costs one warning in the log and is off for the rest of
the run: training goes on and metrics.jsonl keeps every record.

Resume (``--resume`` from a checkpoint) continues the tracker's run: W&B and MLflow by
the run ids saved in ``trackers.json`` in the run directory, trackio by run name.
TensorBoard writes a new event file in the same folder that hides the old events
after the checkpoint's step (``purge_step``), as metrics.jsonl drops those lines; a
fresh start in a used folder hides all earlier events. W&B and MLflow keep the values
of the steps a killed run logged past its checkpoint; the resumed run logs those
steps again. A run that ends without ``close`` (an error, Ctrl-C) is closed as failed
when the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlmtune.atomic import atomic_write
from vlmtune.config import ConfigError, JobFile, dump_toml
from vlmtune.recipes.tracker_backends import (
    BACKENDS,
    MODULES,
    RunInfo,
    Tracker,
    TrackerError,
)

STATE_FILE = "trackers.json"  # the run ids a resumed run continues
# Fields of a record that are not metrics: the x axis, and a constant of the run.
NOT_METRICS = ("step", "total_steps")

LogFn = Callable[[str], object]


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record a tracker plots: every finite int or float
    except the step and ``total_steps`` (booleans, strings and lists are not plotted)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in NOT_METRICS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class Trackers:
    """The started trackers of one run; each one that fails mid-run is dropped with a
    warning through ``log``. Empty (and free) when the job names none."""

    def __init__(self, trackers: list[Tracker] | None = None, log: LogFn = print) -> None:
        self.active: list[Tracker] = list(trackers or [])
        self.say = log
        self.step = 0
        if self.active:  # an error or Ctrl-C ends the run without close(): failed
            atexit.register(self._at_exit)

    def __bool__(self) -> bool:
        return bool(self.active)

    def begin(self, start_step: int) -> None:
        self.step = start_step
        self._each(lambda t: t.begin(start_step))

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record, at its step (a record without one: the last step)."""
        if not self.active:
            return
        self.step = int(record.get("step", self.step))
        scalars = scalars_of(record)
        if scalars:
            self._each(lambda t: t.log(scalars, self.step))

    def close(self, ok: bool = True) -> None:
        """Finish every tracker's run (``ok``: as finished, else as failed); once."""
        atexit.unregister(self._at_exit)
        active, self.active = self.active, []
        for tracker in active:
            try:
                tracker.close(ok)
            except Exception as e:  # the run is over: say so, nothing to stop
                self.say(f"warning: logging.report_to: {tracker.name} did not close: {e}")

    def _at_exit(self) -> None:
        self.close(ok=False)

    def _each(self, call: Callable[[Tracker], object]) -> None:
        for tracker in list(self.active):
            try:
                call(tracker)
            except Exception as e:  # a tracker never stops the training
                self.active.remove(tracker)
                self.say(
                    f"warning: logging.report_to: {tracker.name} failed ({type(e).__name__}: "
                    f"{e}); it is off for the rest of this run (metrics.jsonl has every record)"
                )
                with contextlib.suppress(Exception):
                    tracker.close(False)


def start_trackers(job: JobFile, run_dir: Path, resumed: bool, log: LogFn = print) -> Trackers:
    """Start every tracker the job names (call on the main process only); a
    ``ConfigError`` naming ``logging.report_to`` and each tracker that cannot start
    (those that did are closed again). ``resumed``: a checkpoint will be loaded, so
    each tracker continues the run ``trackers.json`` names."""
    names = job.logging.report_to
    if not names:
        return Trackers(log=log)
    saved = _read_state(run_dir) if resumed else {}  # a fresh start begins new runs
    config = job.model_dump(mode="json", exclude_none=True)
    base = RunInfo(
        logging=job.logging,
        run_dir=run_dir,
        project=job.logging.project or job.job.name or run_dir.resolve().name,
        run_name=job.logging.run_name or run_dir.resolve().name,
        config=config,
        config_toml=dump_toml(job),
        resumed=resumed,
    )
    started: list[Tracker] = []
    problems: list[str] = []
    for name in names:
        info = replace(base, saved=saved.get(name, {}))
        try:
            started.append(BACKENDS[name].start(info))
        except TrackerError as e:
            problems.append(f"logging.report_to: {name} could not start: {e}")
    trackers = Trackers(started, log)
    if problems:
        trackers.close(ok=False)
        raise ConfigError("job file", problems)
    # A resumed run keeps the ids of trackers it no longer names, for a later resume.
    _write_state(run_dir, {**saved, **{t.name: t.state() for t in started}})
    log(
        f"experiment tracking: {', '.join(names)} (project {base.project!r}, run {base.run_name!r})"
    )
    return trackers


def _read_state(run_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet (no tracker before), or damaged: new runs
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    with atomic_write(run_dir / STATE_FILE) as f:
        f.write(json.dumps(state, indent=2) + "\n")


def server_job_problems(job: JobFile, job_dir: Path) -> list[str]:
    """What a TOML job submitted to ``vlmtune serve`` may not ask of its trackers: one
    not installed where the job runs, a TensorBoard folder or an MLflow store outside
    the job's folder (where the server keeps everything a job writes). A relative
    ``logging.log_dir`` is placed in the job's folder."""
    problems = [
        f"logging.report_to: {name} is not installed on this server (the operator can "
        f"install it: pip install 'vlmtune[{name}]')"
        for name in job.logging.report_to
        if importlib.util.find_spec(MODULES[name]) is None
    ]
    log_dir = job.logging.log_dir
    if log_dir is not None:
        placed = (job_dir / Path(log_dir).expanduser()).resolve()
        if Path(log_dir).expanduser().is_absolute() or not placed.is_relative_to(job_dir):
            problems.append(
                f"logging.log_dir: {log_dir!r} is outside the job's folder, where the server "
                "keeps everything a job writes; give a relative folder name (or leave it unset)"
            )
        else:
            job.logging.log_dir = str(placed)
    uri = job.logging.mlflow_tracking_uri
    if uri is not None and not uri.startswith(("http://", "https://")):
        problems.append(
            f"logging.mlflow_tracking_uri: {uri!r} would write on the server's disk outside "
            "the job's folder; name an MLflow server (http:// or https://), or leave it "
            "unset for the run's own store"
        )
    return problems
