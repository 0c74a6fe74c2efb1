"""Per-step records of a Tinker-protocol run: ``<run dir>/metrics.jsonl``, as a recipe's.

A client drives such a run with its own loop, so the server sees only the primitives:
every ``forward_backward`` since the last ``optim_step`` is tallied (its loss, data and
tokens), and each ``optim_step`` appends one record in the recipes' shape::

    {"step": 3, "loss": 1.92, "learning_rate": 0.001, "grad_norm": 0.41, "examples": 8,
     "tokens": 1310, "step_s": 0.52, "examples_per_s": 15.4, "tokens_per_s": 2519.2}

so that ``vlmtune.report`` draws the run's page from the folder as it draws a job's.
``loss`` is the mean of those calls' ``loss:sum`` (left out when none reported one);
``step_s`` is the wall time since the previous ``optim_step`` (for the first one
recorded, since that step's first ``forward_backward``), the client's own time between
calls included. Only numbers the primitives already returned are used: recording
costs no device sync.

Recording is a side channel: it never fails a training call. Any error writing is
logged once, and the run records nothing more until the server restarts. A step
recorded again (the weights went back: ``load_state``, or a restart from the last
saved state) replaces the record of that step and of every later one, as a recipe's
``--resume`` does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmtune.atomic import atomic_write
from vlmtune.recipes.run_dir import METRICS_FILE, strict_json
from vlmtune.types import AdamParams, Datum

log = logging.getLogger("vlmtune.server")


class RunMetrics:
    """The tally since the last ``optim_step`` and the writer of one run's records.
    Called from the run's worker thread only (one task at a time), so it holds no lock;
    a report reading the file meanwhile takes only whole lines."""

    def __init__(self, run_dir: Path, run_id: str) -> None:
        self.path = run_dir / METRICS_FILE
        self.run_id = run_id
        self.failed = False
        self._losses: list[float] = []
        self._examples = 0
        self._tokens = 0
        self._started: float | None = None  # monotonic: this step's first forward_backward
        self._last_step_end: float | None = None
        self._last_step: int | None = None  # the file's last recorded step (read once)

    def forward_backward(self, datums: Sequence[Datum], metrics: dict[str, float]) -> None:
        """Tally one training ``forward_backward`` (a forward-only call trains nothing)."""
        if self.failed:
            return
        if self._started is None:
            self._started = time.monotonic()
        loss = metrics.get("loss:sum")
        if isinstance(loss, int | float):
            self._losses.append(float(loss))
        self._examples += len(datums)
        self._tokens += sum(d.model_input.length for d in datums)

    def optim_step(self, step: int, params: AdamParams, metrics: dict[str, Any]) -> None:
        """Append the record of optimizer step ``step`` and start a new tally."""
        if self.failed:
            return
        now = time.monotonic()
        since = self._last_step_end if self._last_step_end is not None else self._started
        step_s = None if since is None else now - since
        record = step_record(step, params, metrics, self._losses, self._examples,
                             self._tokens, step_s)  # fmt: skip
        self._losses, self._examples, self._tokens = [], 0, 0
        self._started, self._last_step_end = None, now
        try:
            self._append(record)
        except Exception as e:  # noqa: BLE001 - a side channel must not fail training
            self.failed = True
            log.warning(
                "run %s: cannot record metrics in %s (%s: %s); this run records no "
                "more steps until the server restarts", self.run_id, self.path,
                type(e).__name__, e,
            )  # fmt: skip

    def _append(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if self._last_step is None:
            self._last_step = last_recorded_step(self.path)
        if step <= self._last_step:  # the weights went back: cut the later records
            keep = [r for r in read_records(self.path) if r.get("step", 0) < step]
            with atomic_write(self.path) as f:
                f.write("".join(strict_json(r) + "\n" for r in keep))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(strict_json(record) + "\n")
        self._last_step = step


def step_record(
    step: int,
    params: AdamParams,
    metrics: dict[str, Any],
    losses: list[float],
    examples: int,
    tokens: int,
    step_s: float | None,
) -> dict[str, Any]:
    """One ``metrics.jsonl`` record, in the keys the recipes write and the report draws."""
    record: dict[str, Any] = {"step": step}
    if losses:
        record["loss"] = sum(losses) / len(losses)
    record["learning_rate"] = params.learning_rate
    grad_norm = metrics.get("grad_norm")
    if isinstance(grad_norm, int | float):
        record["grad_norm"] = float(grad_norm)
    record["examples"] = examples
    record["tokens"] = tokens
    if step_s is not None:
        record["step_s"] = step_s
        if step_s > 0:
            record["examples_per_s"] = examples / step_s
            record["tokens_per_s"] = tokens / step_s
    return record


def read_records(path: Path) -> list[dict[str, Any]]:
    """The file's JSON-object lines (none if it is missing); anything else is dropped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("step"), int):
            out.append(value)
    return out


def last_recorded_step(path: Path) -> int:
    return max((r["step"] for r in read_records(path)), default=0)
