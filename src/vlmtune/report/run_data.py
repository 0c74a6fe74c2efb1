"""A run directory read back for its report: every file optional but the run's own
records, each read once, nothing interpreted yet beyond splitting steps from evals.

A run still going has no ``summary.json``; one made before a file was recorded
(``applied_settings.json``, ``evals/``) lacks it. The report shows what there is and
says what is missing, so reading never fails on an absent file, only on a folder that
is no run at all (``ReportError``).
"""

from __future__ import annotations

import base64
import json
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.recipes.run_files import (
    CONFIG_FILE,
    EVALS_DIR,
    METRICS_FILE,
    REPORT_FILE,
    SETTINGS_FILE,
    SUMMARY_FILE,
)

# A run whose metrics.jsonl changed this recently and that has no summary is running.
RUNNING_WITHIN_S = 600
MAX_IMAGE_BYTES = 512 * 1024  # an eval image copy larger than this is not inlined
IMAGE_MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
              "webp": "image/webp", "gif": "image/gif"}  # fmt: skip
_STEP_FILE = re.compile(r"^step-(\d+)\.jsonl$")


class ReportError(ValueError):
    """The folder is not a run directory (no config.toml and no metrics.jsonl)."""


@dataclass
class Predictions:
    """One eval's predictions (``evals/step-N.jsonl``), and its images."""

    step: int
    records: list[dict[str, Any]]
    run_dir: Path  # where the records' images are (evals/images/...)
    other_steps: list[int] = field(default_factory=list)  # the run's other evals

    def image(self, name: str) -> str | None:
        """The record's image ``name`` as a data URL (read when a card shows it: a page
        inlines only the images it shows)."""
        return image_data_url(self.run_dir, name)

    @property
    def by_reward(self) -> bool:
        """Right means rewarded: an RL eval whose prompts have no reference answer
        (no ``metadata.answer``), so exact match says nothing and the reward does."""
        return bool(self.records) and all(
            not r.get("answer") and isinstance(r.get("reward"), int | float) for r in self.records
        )

    def is_right(self, record: dict[str, Any]) -> bool:
        return record.get("reward", 0) > 0 if self.by_reward else bool(record.get("correct"))

    @property
    def right(self) -> list[dict[str, Any]]:
        return [r for r in self.records if self.is_right(r)]

    @property
    def wrong(self) -> list[dict[str, Any]]:
        return [r for r in self.records if not self.is_right(r)]


@dataclass
class RunData:
    path: Path
    config: dict[str, Any]
    train: list[dict[str, Any]]  # metrics.jsonl records of optimizer steps
    evals: list[dict[str, Any]]  # metrics.jsonl records of evals (eval/... keys)
    summary: dict[str, Any] | None = None
    data_report: dict[str, Any] | None = None  # validation_report.json
    settings: dict[str, Any] | None = None  # applied_settings.json
    predictions: Predictions | None = None
    broken_lines: list[int] = field(default_factory=list)  # metrics lines not JSON objects
    last_write: float | None = None  # when metrics.jsonl last changed (epoch seconds)
    # A server's Tinker-protocol run: the client's own loop, recorded step by step by the
    # server; it has no job, data report, evals or summary, so the page leaves them out.
    client_loop: bool = False

    @property
    def name(self) -> str:
        return str(self.config.get("job", {}).get("name") or self.path.name)

    @property
    def model(self) -> str | None:
        return self.config.get("job", {}).get("model")

    @property
    def method(self) -> str | None:
        """sft, dpo or rl: as the run recorded it, else its config, else its metrics."""
        if self.settings and self.settings.get("method"):
            return str(self.settings["method"])
        method = self.config.get("algorithm", {}).get("method")
        if method:
            return str(method)
        keys = {k for r in self.train for k in r}
        if "dpo_loss" in keys:
            return "dpo"
        return "rl" if "reward_mean" in keys else ("sft" if keys else None)

    @property
    def total_steps(self) -> int | None:
        for record in reversed(self.train + self.evals):
            if isinstance(record.get("total_steps"), int):
                return record["total_steps"]
        steps = (self.summary or {}).get("steps")
        return steps if isinstance(steps, int) else None

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.train if isinstance(r.get("step"), int)]
        return max(steps, default=0)

    def status(self, now: float | None = None) -> str:
        """finished (a summary), running (records in the last ``RUNNING_WITHIN_S``) or
        stopped (neither: it failed, was interrupted, or waits for ``--resume``)."""
        if self.summary is not None:
            return "finished"
        now = time.time() if now is None else now
        if self.last_write is not None and now - self.last_write < RUNNING_WITHIN_S:
            return "running"
        return "stopped"


def is_eval(record: dict[str, Any]) -> bool:
    return any(k.startswith("eval/") for k in record)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(the records, the numbers of lines that are not JSON objects). A line being
    written (no newline yet) is read if whole, as the server's follower does."""
    records, broken = [], []
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            broken.append(number)
            continue
        if isinstance(value, dict):
            records.append(value)
        else:
            broken.append(number)
    return records, broken


def _json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable (one being written)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_predictions(run_dir: Path) -> Predictions | None:
    """The last eval's predictions: the final model's, in a finished run."""
    folder = run_dir / EVALS_DIR
    steps = sorted(
        int(m.group(1)) for p in folder.glob("step-*.jsonl") if (m := _STEP_FILE.match(p.name))
    )
    if not steps:
        return None
    step = steps[-1]
    records, _ = read_metrics(folder / f"step-{step}.jsonl")
    return Predictions(step, records, run_dir, steps[:-1])


def image_data_url(run_dir: Path, name: str) -> str | None:
    """``name`` (under ``evals/images``) as a data URL; None if missing, too large, of
    an unknown kind, or outside the run directory."""
    path = (run_dir / name).resolve()
    images = (run_dir / EVALS_DIR / "images").resolve()
    mime = IMAGE_MIME.get(path.suffix.lower().lstrip("."))
    if mime is None or not path.is_relative_to(images) or not path.is_file():
        return None
    data = path.read_bytes()
    if len(data) > MAX_IMAGE_BYTES:
        return None
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def read_run(run_dir: str | Path) -> RunData:
    """Everything a report shows of ``run_dir``; ``ReportError`` if it is no run."""
    path = Path(run_dir)
    config_file, metrics_file = path / CONFIG_FILE, path / METRICS_FILE
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory")
    if not config_file.is_file() and not metrics_file.is_file():
        raise ReportError(
            f"{path}: not a run directory (it has neither {CONFIG_FILE} nor {METRICS_FILE}; "
            "a run directory is what `vlmtune train --output` names)"
        )
    config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ReportError(f"{config_file}: not a readable job file: {e}") from None
    records, broken = read_metrics(metrics_file) if metrics_file.is_file() else ([], [])
    summary = _json(path / SUMMARY_FILE)
    return RunData(
        path=path,
        config=config,
        train=[r for r in records if not is_eval(r)],
        evals=[r for r in records if is_eval(r)],
        summary=summary if isinstance(summary, dict) else None,
        data_report=_dict_or_none(_json(path / REPORT_FILE)),
        settings=_dict_or_none(_json(path / SETTINGS_FILE)),
        predictions=read_predictions(path),
        broken_lines=broken,
        last_write=metrics_file.stat().st_mtime if metrics_file.is_file() else None,
    )


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None
