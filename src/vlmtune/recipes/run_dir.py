"""A run's directory: every file a recipe writes there, from the main process only,
each one whole or not at all.

    config.toml              the job as it ran (vision defaults applied)
    validation_report.json   {"train": ValidationReport, "validation": ...}: what was kept
    metrics.jsonl            one JSON object per optimizer step or eval (MetricsLog)
    summary.json             the run's final numbers
    trackers.json            the run ids of [logging] report_to's trackers (``trackers.py``)
    checkpoints/step-N.remote, reference_logps.json, ...   (``write_text``/``write_json``)

Under torchrun every rank runs the same loop and computes the same records; only
rank 0 writes, or N ranks would write every file N times (and race on it). A reader
(``vlmtune serve`` following a job, a user's ``cat``) never sees half a file: each
is written beside its target and renamed into place.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmtune.atomic import atomic_write, explain_refused_writes
from vlmtune.config import JobFile, dump_toml
from vlmtune.data.report import ValidationReport
from vlmtune.engine.distributed import is_main_process
from vlmtune.recipes.run_files import CONFIG_FILE as CONFIG_FILE  # re-exported
from vlmtune.recipes.run_files import METRICS_FILE as METRICS_FILE
from vlmtune.recipes.run_files import REPORT_FILE as REPORT_FILE
from vlmtune.recipes.run_files import SUMMARY_FILE as SUMMARY_FILE
from vlmtune.recipes.trackers import Trackers, start_trackers


class ResumeError(ValueError):
    """``--resume`` cannot continue the run as asked: no checkpoint is whole, one was
    saved under other settings, or a file of the run is damaged. ``vlmtune train``
    prints the message and exits 2, as for a job file mistake."""


class RunDir:
    """The run directory ``path``; writes happen on the main process alone (``main``,
    default: rank 0 of torchrun, or this process when there is no torchrun). ``log``
    takes the one line said about a damaged file that was mended (``MetricsLog``)."""

    def __init__(
        self, path: Path, main: bool | None = None, log: Callable[[str], object] = print
    ) -> None:
        self.path = path
        self.main = is_main_process() if main is None else main
        self.log = log
        # when this process began the run (a resumed one: when it resumed); summary's wall_s
        self.started = time.time()
        # The checkpoint --resume loads (``recipes.common.prepare`` chooses it).
        self.resume_from: str | None = None
        # [logging] report_to's trackers, fed by ``metrics()``; started by ``start_trackers``.
        self.trackers = Trackers(log=log)
        # Every rank: checkpoint shards are written into it by all of them.
        with explain_refused_writes(path, "the run directory"):
            path.mkdir(parents=True, exist_ok=True)

    def write_text(self, name: str, text: str) -> None:
        """``name`` (relative to the run directory) holds ``text``; its folder is made."""
        if not self.main:
            return
        target = self.path / name
        with explain_refused_writes(target, name):
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(target) as f:
                f.write(text)

    def write_json(self, name: str, data: Any, indent: int | None = 2) -> None:
        self.write_text(name, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")

    def write_config(self, job: JobFile) -> None:
        """``config.toml``: the job as it runs, a file ``vlmtune train`` runs again."""
        self.write_text(CONFIG_FILE, dump_toml(job))

    def start_trackers(self, job: JobFile) -> None:
        """Start the job's trackers (main process only; a resume from a checkpoint
        continues their runs): a ``ConfigError`` for one that cannot start. Call it
        after choosing ``resume_from`` and before the model loads."""
        if self.main:
            self.trackers = start_trackers(job, self.path, self.resume_from is not None, self.log)

    def write_report(self, train: ValidationReport, validation: ValidationReport | None) -> None:
        """``validation_report.json``: the rows each file kept and dropped, and why."""
        report = {"train": train.to_dict()}
        if validation is not None:
            report["validation"] = validation.to_dict()
        self.write_json(REPORT_FILE, report)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json``: strict JSON, a non-finite number as null (``strict_json``)."""
        self.write_text(SUMMARY_FILE, strict_json(summary, indent=2) + "\n")

    def metrics(self, resume_step: int | None, total_steps: int | None = None) -> MetricsLog:
        """The run's ``metrics.jsonl``, cut back to ``resume_step`` on a resume; every
        record also goes to the run's trackers."""
        self.trackers.begin(resume_step or 0)
        return MetricsLog(
            self.path / METRICS_FILE, resume_step, total_steps, self.main, self.log, self.trackers
        )


class MetricsLog:
    """``metrics.jsonl``: one JSON object per step or eval; on resume, later lines are cut.

    With ``total_steps`` every record says how many steps the run has, so a reader of
    the file alone (the server following a job) can show "step 3/10". Records are
    appended one whole line at a time; a reader takes only lines that end in a newline.
    A process killed (or a disk filled) mid-append leaves a last line without its
    newline: a resume drops it, says so through ``log``, and appends on a fresh line.
    Each record written also goes to ``trackers`` (``[logging] report_to``).
    """

    def __init__(
        self,
        path: Path,
        resume_step: int | None = None,
        total_steps: int | None = None,
        main: bool | None = None,
        log: Callable[[str], object] = print,
        trackers: Trackers | None = None,
    ) -> None:
        self.path = path
        self.total_steps = total_steps
        self.trackers = trackers if trackers is not None else Trackers(log=log)
        # other ranks compute the same records
        self.enabled = is_main_process() if main is None else main
        if not self.enabled:
            return
        with explain_refused_writes(path, "the metrics"):
            if resume_step is not None and path.exists():
                kept = [
                    line
                    for line in self._records(log)
                    if json.loads(line).get("step", 0) <= resume_step
                ]
                with atomic_write(path) as f:
                    f.write("".join(f"{line}\n" for line in kept))
            elif resume_step is None:
                with atomic_write(path) as f:
                    f.write("")

    def _records(self, log: Callable[[str], object]) -> list[str]:
        """The file's records, each one JSON object; a last line cut mid-write is left
        out (and logged), any other broken line is a ``ResumeError`` naming it."""
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")  # after a final newline, the last item is ""
        records: list[str] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if _is_record(line):
                records.append(line)
            elif number == len(lines):  # no newline after it: the append was cut short
                log(
                    f"{self.path}:{number}: dropped an incomplete last line "
                    f"({len(line.encode())} bytes, cut off mid-write)"
                )
            else:
                raise ResumeError(
                    f"{self.path}:{number}: not a JSON object ({line[:80]!r}); this is not "
                    "an append cut short (a later line follows): fix or delete that line, "
                    "then resume"
                )
        return records

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.total_steps is not None and "step" in record:
            record = {"step": record["step"], "total_steps": self.total_steps, **record}
        what = f"the metrics of step {record['step']}" if "step" in record else "the metrics"
        with explain_refused_writes(self.path, what), self.path.open("a", encoding="utf-8") as f:
            f.write(strict_json(record) + "\n")
        self.trackers.log(record)  # after the line: the file stays the record of truth


def _is_record(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, and a NaN-free parse of odd numbers
        return False


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN and infinity (in nested dicts and lists too) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(data: Any, indent: int | None = None) -> str:
    """JSON that every parser reads: Python writes NaN and infinities as the literals
    ``NaN``/``Infinity``, which are not JSON (``jq``, browsers and Go refuse them).
    They are written as null, not as strings, so a column of numbers stays numbers
    and a reader that plots it sees a gap."""
    return json.dumps(finite_or_none(data), indent=indent, ensure_ascii=False, allow_nan=False)
