"""One TOML job's worker process: started, watched until it exits, stopped.

A TOML job runs ``python -m vlmtune train --type T --config FILE --output RUN_DIR`` in
its own process, so a crash, an out-of-memory kill or a cancel never takes the server
down. Its progress comes from the run directory's ``metrics.jsonl``, the record the CLI
writes (``job_progress``); its stderr is kept as a plain log for humans (``log``
events, ``stderr.log``) and never parsed. When it succeeds, the run's ``final/``
directory is promoted to a model named after the job.

``JobRunner`` (``jobs``) owns the table of running workers, its lock, and the states a
cancel or a shutdown decides; a ``JobProcess`` is handed what it needs (the store, the
runner's way to set a state, the job's folder) and hands its worker's exit back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlmtune.server import catalog
from vlmtune.server.job_progress import PROGRESS_EVENTS, MetricsTail, job_event
from vlmtune.server.store import Store

SetState = Callable[..., None]  # set_state(job_id, state, **columns): ``JobRunner._set``
OnExit = Callable[["JobProcess", int], None]  # on_exit(worker, exit_code)


class JobProcess:
    """A started worker and the thread that watches it: its stderr relayed, its progress
    reported while it runs and once more when it exits, then ``on_exit`` called (on that
    thread). ``watch`` starts the thread, so the caller can record the start first."""

    def __init__(
        self,
        job: dict[str, Any],  # the job's row; its run_dir is set
        job_dir: Path,  # <data-dir>/jobs/<id>: config.toml and the logs
        resume: bool,
        store: Store,
        set_state: SetState,
        on_exit: OnExit,
        metrics_poll_s: float,  # how often metrics.jsonl is read while the worker runs
    ) -> None:
        """Start the worker (``--resume``: from its run's last checkpoint); ``watch``
        follows it."""
        self.job_id: str = job["id"]
        self.job_dir = job_dir
        self.run_dir = Path(job["run_dir"])
        self.store = store
        self._set = set_state
        self._on_exit = on_exit
        self.metrics_poll_s = metrics_poll_s
        self.stderr_tail: Sequence[str] = ()  # its last stderr lines, once it exited
        cfg = job["config"]
        cmd = [sys.executable, "-m", "vlmtune", "train", "--type", cfg["type"],
               "--config", str(job_dir / "config.toml"), "--output", job["run_dir"],
               *(["--resume"] if resume else []), *cfg.get("overrides", [])]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        stdout = (job_dir / "stdout.log").open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=job_dir, stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=subprocess.PIPE, env=env, start_new_session=True,
        )  # fmt: skip
        stdout.close()
        self._thread = threading.Thread(target=self._monitor, daemon=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def watch(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the worker and anything it started, then wait (30 s at most) for its
        exit to be handled (``on_exit``)."""
        _stop(self.proc)
        self._thread.join(timeout=30)

    def _monitor(self) -> None:
        metrics = self._metrics_tail()
        exited = threading.Event()
        follower = threading.Thread(
            target=self._follow_metrics, args=(metrics, exited), daemon=True
        )
        follower.start()
        self.stderr_tail = self._relay_stderr()
        code = self.proc.wait()
        exited.set()
        follower.join()
        self._report_progress(metrics)  # records written just before the exit
        self._on_exit(self, code)

    def _relay_stderr(self) -> Sequence[str]:
        """Copy the worker's stderr to ``stderr.log`` and ``log`` events, unparsed; return
        its last lines (a failed job's error)."""
        tail: list[str] = []
        with (self.job_dir / "stderr.log").open("a") as log_file:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                log_file.write(line + "\n")
                if line:
                    tail = (tail + [line])[-30:]
                    self.store.add_event(self.job_id, "log", line[:2000])
        return tail

    def _metrics_tail(self) -> MetricsTail:
        # A resumed job's worker rewrites the lines it keeps: those were reported already.
        reported: list[dict[str, Any]] = []
        after = 0
        while events := self.store.events(self.job_id, after):
            after = events[-1]["seq"]
            reported += [e["data"]["metrics"] for e in events if e["type"] in PROGRESS_EVENTS]
        return MetricsTail(self.run_dir / "metrics.jsonl", reported)

    def _follow_metrics(self, metrics: MetricsTail, exited: threading.Event) -> None:
        while not exited.wait(self.metrics_poll_s):
            self._report_progress(metrics)

    def _report_progress(self, metrics: MetricsTail) -> None:
        for record in metrics.read_new():
            kind, message, data = job_event(record)
            self.store.add_event(self.job_id, kind, message, data)

    # ---- the worker's own outcome (the runner decides when a cancel or shutdown did) --
    def succeeded(self, job: dict[str, Any]) -> None:
        """Promote the run's ``final/`` (if any) to a model of ``job``'s owner, named after
        it, and mark the job succeeded. ``job``: its row, read after the exit."""
        run_dir = Path(job["run_dir"])
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            summary = {}  # the model is still promoted: the summary is only reported
        final = run_dir / "final"
        model_id = None
        if final.is_dir():
            base = (
                tomllib.loads((self.job_dir / "config.toml").read_text())
                .get("job", {})
                .get("model", "")
            )
            model_id = catalog.unique_model_id(self.store, catalog.model_name(job["name"]))
            source = {"job_id": self.job_id, "checkpoint": "final"}
            catalog.add_model(self.store, model_id, final, base, source, job["tenant"])
            self.store.add_event(
                self.job_id, "promoted", f"model {model_id}", {"model_id": model_id}
            )
        self._set(self.job_id, "succeeded", exit_code=0, model_id=model_id)
        self.store.add_event(
            self.job_id, "succeeded", "finished", {"summary": summary, "model_id": model_id}
        )

    def failed(self, code: int) -> None:
        """Mark the job failed, its last stderr lines as the error."""
        self._set(self.job_id, "failed", exit_code=code, error="\n".join(self.stderr_tail[-12:]))
        self.store.add_event(self.job_id, "failed", f"worker exited with code {code}")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the worker and anything it started
        proc.wait(timeout=15)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
