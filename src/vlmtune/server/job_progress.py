"""A TOML job's progress, read from its run directory's ``metrics.jsonl``.

The worker process writes ``metrics.jsonl`` as the CLI does (one JSON object per
optimizer step or eval; see ``recipes.run_dir.MetricsLog``), so SFT, DPO and RL report
through the same record and nothing parses the worker's human-readable output.
``MetricsTail`` follows the file while another process appends to it; ``job_event``
turns one record into the job event clients read.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("vlmtune.server")
EVAL_PREFIX = "eval/"
PROGRESS_EVENTS = ("progress", "eval")  # the event types ``job_event`` makes


def record_key(record: dict[str, Any]) -> str:
    """What makes two records the same record (key order and whitespace do not)."""
    return json.dumps(record, sort_keys=True)


class MetricsTail:
    """New complete records of a ``metrics.jsonl`` that another process appends to.

    Only whole lines count: a last line without its newline is still being written and
    is read on a later call. ``--resume`` rewrites the file (it keeps the lines up to
    the checkpoint, then appends), so when the bytes before our position change the
    file is read again from the start, and records already reported, here or in an
    earlier attempt of the job (``reported``), are not reported twice. A record that
    is byte-for-byte one already reported (an eval repeated after a resume with the
    same result) is therefore reported once.
    """

    def __init__(self, path: Path, reported: Iterable[dict[str, Any]] = ()) -> None:
        self.path = path
        self._offset = 0  # bytes consumed: every complete line before it
        self._last_line = b""  # the complete line that ends at _offset
        self._reported = {record_key(r) for r in reported}

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                if not self._unchanged_before_offset(f):
                    self._offset, self._last_line = 0, b""
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:  # the worker has not started its loop yet
            return []
        lines_L = chunk[: chunk.rfind(b"\n") + 1].splitlines(keepends=True)
        new: list[dict[str, Any]] = []
        for raw in lines_L:
            self._offset += len(raw)
            self._last_line = raw
            record = _parse(raw, self.path)
            if record is None:
                continue
            key = record_key(record)
            if key not in self._reported:
                self._reported.add(key)
                new.append(record)
        return new

    def _unchanged_before_offset(self, f: Any) -> bool:
        if self._offset == 0:
            return True
        f.seek(self._offset - len(self._last_line))
        return bool(f.read(len(self._last_line)) == self._last_line)


def _parse(raw: bytes, path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        log.warning("%s: skipping a line that is not a JSON object: %r", path, raw[:200])
        return None
    return record


def _shown(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return str(value)


def job_event(record: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """One ``metrics.jsonl`` record -> (event type, message, data).

    A record with ``eval/...`` keys is an ``eval`` event, any other a ``progress``
    event. ``data["metrics"]`` is the record exactly as written; ``step``, ``total``,
    ``loss`` (and ``accuracy`` for an eval) are lifted out as the events always had
    them. ``total`` is the record's ``total_steps``, ``None`` where it has none.
    """
    step = record.get("step")
    if any(k.startswith(EVAL_PREFIX) for k in record):
        evals = {k.removeprefix(EVAL_PREFIX): v for k, v in record.items() if k.startswith(EVAL_PREFIX)}  # fmt: skip
        data = {"step": step, "metrics": record}
        data.update({k: evals[k] for k in ("loss", "accuracy") if k in evals})
        message = f"eval @ step {step}: " + "  ".join(f"{k} {_shown(v)}" for k, v in evals.items())
        return "eval", message, data
    total = record.get("total_steps")
    data = {"step": step, "total": total, "metrics": record}
    if "loss" in record:
        data["loss"] = record["loss"]
    headline = [f"{k} {_shown(record[k])}" for k in ("loss", "reward_mean") if k in record]
    message = "  ".join([f"step {step}" + (f"/{total}" if total is not None else ""), *headline])
    return "progress", message, data
