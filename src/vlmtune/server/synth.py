"""The hosted Qwen3-VL trainer's CLI (``synth-ai`` 0.2.x) pointed at this server.

``synth-ai train --type sft --config ft_vl.toml --backend URL`` uploads the JSONL
(``POST /api/files``), creates a learning job (``POST /api/learning/jobs``), starts it
and polls its status, events, metrics and timeline. Here each of those is an existing
piece: the upload is a file in the server's file store, checked row by row with
vlmtune's own loader; the job is a TOML job (``JobRunner.submit_toml``), validated and
confined as every job is, from the hosted trainer's keys that ``synth_config`` puts
back together from the CLI's body; every note on a key used or ignored becomes a job
event, so the CLI prints it. Progress is the job's events (``job_progress`` follows its
``metrics.jsonl``), renamed into the CLI's words.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlmtune.config import ConfigError
from vlmtune.data.validate import validate_dataset
from vlmtune.protocol.errors import BadRequest, NotFound
from vlmtune.protocol.files import DEFAULT_PURPOSE
from vlmtune.server.files import file_json
from vlmtune.server.jobs import JobRunner
from vlmtune.server.store import Store
from vlmtune.server.synth_config import body_problems, dialect_notes, hosted_job, toml_text

REQUEST_NAME = "synth_request.json"  # the create body as sent, in the job's folder
REPORT_NAME = ".validation.json"  # an upload's row report, beside the upload
SHOWN_DROPS = 20  # dropped rows listed in an upload's report (the count is whole)
PAGE = 500  # events read per store query

# vlmtune's job state -> the status word the CLI knows (``synth_ai/streaming/
# streamer.py`` TERMINAL_STATUSES). An interrupted job waits for a resume the CLI never
# asks for, so the CLI is told it failed (and the error says how to resume it).
STATUS_OF_STATE = {
    "submitted": "queued",
    "queued": "queued",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
    "deleted": "cancelled",
    "interrupted": "failed",
}
TERMINAL = ("succeeded", "failed", "cancelled", "deleted", "interrupted")
# vlmtune's event type -> the hosted trainer's. ``sft.job.completed``/``failed`` end the
# CLI's stream; ``sft.progress`` and ``sft.created`` are hidden by it (metrics show them).
EVENT_TYPES = {
    "created": "sft.created",
    "queued": "sft.queued",
    "running": "sft.training.started",
    "progress": "sft.progress",
    "eval": "sft.validation.summary",
    "log": "sft.log",
    "promoted": "sft.model.promoted",
    "succeeded": "sft.job.completed",
    "failed": "sft.job.failed",
    "cancelled": "sft.job.cancelled",
    "interrupted": "sft.job.interrupted",
    "deleted": "sft.job.deleted",
}
LEVELS = {"failed": "error", "interrupted": "warning", "cancelled": "warning"}
STATE_EVENTS = ("created", "queued", "running", *TERMINAL)
METRIC_EVENTS = {"progress": "train", "eval": "val"}  # event type -> metric name prefix
NOT_METRICS = ("step", "total_steps")  # a record's coordinates, not its measurements


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


# ---- uploads --------------------------------------------------------------------------
def check_upload(row: dict[str, Any]) -> dict[str, Any]:
    """Read a training upload as training will (``validate_dataset``) and keep the row
    report beside it; ``BadRequest`` when no row survives (the caller deletes it)."""
    path = Path(row["path"])
    report = validate_dataset(path, "sft")
    summary = {
        "rows": report.total,
        "valid": report.valid,
        "dropped": len(report.dropped),
        "dropped_rows": report.to_dict()["dropped"][:SHOWN_DROPS],
        "warnings": len(report.warnings),
        "images": report.images,
    }
    if report.valid == 0:
        reasons = "; ".join(f"line {d['line']}: {d['reason']}" for d in summary["dropped_rows"][:5])
        raise BadRequest(
            f"{row['filename']}: no trainable row in {report.total} "
            f"({reasons or 'the file is empty'})"
        )
    (path.parent / REPORT_NAME).write_text(json.dumps(summary))
    return summary


def upload_report(row: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return json.loads((Path(row["path"]).parent / REPORT_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # not a training upload, or uploaded through /v1/files


def synth_file_json(row: dict[str, Any]) -> dict[str, Any]:
    """A file as the CLI reads one: ``id`` and a ``status`` it counts as ready."""
    out = file_json(row) | {"status": "ready"}
    report = upload_report(row)
    if report is not None:
        out["validation"] = report
    return out


def needs_check(purpose: str) -> bool:
    return purpose == DEFAULT_PURPOSE


def job_name(body: dict[str, Any], model: str) -> str:
    """The job's name, and so its promoted model's id: the body's suffix, else the
    requested model's own name."""
    suffix = str(body.get("suffix") or "").strip()
    return suffix or f"{str(body.get('model') or model).split('/')[-1]}-sft"


def create_job(jobs: JobRunner, body: dict[str, Any], model: str, tenant: str) -> dict[str, Any]:
    """Submit the learning job as a TOML job; its notes and its data's dropped rows
    become events. ``ConfigError`` (every problem) leaves nothing behind."""
    name = job_name(body, model)
    raw, notes = hosted_job(body, model, name)
    try:
        row = jobs.submit_toml(toml_text(raw), "sft", [], name, tenant=tenant)
    except ConfigError as e:
        raise body_problems(e) from None
    folder = jobs.dir / row["id"]
    (folder / REQUEST_NAME).write_text(json.dumps({"request": body, "model": model}))
    for note in [*notes, *dialect_notes(raw)]:
        jobs.store.add_event(row["id"], "config", note)
    for file_id in row["config"].get("files", []):
        report = upload_report(jobs.files.get(file_id))
        if report and report["dropped"]:
            shown_rows = "; ".join(
                f"line {d['line']}: {d['reason']}" for d in report["dropped_rows"][:3]
            )
            jobs.store.add_event(
                row["id"], "data",
                f"{file_id}: {report['dropped']} of {report['rows']} rows dropped ({shown_rows})",
                {"file_id": file_id, "validation": report},
            )  # fmt: skip
    return jobs.get(row["id"])


# ---- what the CLI polls -----------------------------------------------------------------
def learning_job(jobs: JobRunner, job_id: str, tenant: str | None) -> dict[str, Any]:
    """A TOML job ``tenant`` (None: any) owns; a trainer endpoint is no learning job."""
    row = jobs.get(job_id, tenant)
    if row["kind"] != "toml":
        raise NotFound(f"unknown learning job {job_id!r} ({job_id} is a trainer endpoint)")
    return row


def _request(folder: Path, row: dict[str, Any]) -> dict[str, Any]:
    """The create body as sent; for a job submitted otherwise, what its config says."""
    try:
        return json.loads((folder / REQUEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        pass
    try:
        model = tomllib.loads((folder / "config.toml").read_text())["job"]["model"]
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        model = None
    files = row["config"].get("files") or [None]
    return {"request": {"model": model, "training_file_id": files[0]}, "model": model}


def job_json(jobs_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    """The job as the CLI's status poll reads it: ``status`` (its words), ``error``,
    ``fine_tuned_model`` (the promoted model, served by /v1/chat/completions).
    ``jobs_dir``: where job folders are (``JobRunner.dir``)."""
    sent = _request(jobs_dir / row["id"], row)
    request = sent["request"]
    error = row["error"]
    if row["state"] == "interrupted":
        error = (
            f"interrupted: the server stopped while job {row['id']} ran; "
            f"POST /api/learning/jobs/{row['id']}/start resumes it"
        )
    return {
        "id": row["id"],
        "job_id": row["id"],
        "object": "learning.job",
        "status": STATUS_OF_STATE.get(row["state"], row["state"]),
        "vlmtune_state": row["state"],
        "training_type": request.get("training_type", "sft_offline"),
        "model": request.get("model"),
        "base_model": sent.get("model"),
        "training_file_id": request.get("training_file_id"),
        "hyperparameters": request.get("hyperparameters", {}),
        "metadata": request.get("metadata", {}),
        "created_at": iso(row["created"]),
        "updated_at": iso(row["updated"]),
        "error": error,
        "fine_tuned_model": row["model_id"],
    }


def start(jobs: JobRunner, job_id: str, tenant: str | None) -> dict[str, Any]:
    """A created job is already queued (the CLI starts every job it creates at once);
    an interrupted one resumes, and any other is left as it is."""
    row = learning_job(jobs, job_id, tenant)
    if row["state"] == "interrupted":
        return jobs.resume(job_id, tenant)
    return row


def _current(state: str, row: dict[str, Any]) -> bool:
    """A terminal state that is still the job's (a resumed job's old failure is not)."""
    return state not in TERMINAL or row["state"] == state


def event_json(row: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    kind = event["type"]
    synth_type = EVENT_TYPES.get(kind, f"vlmtune.{kind}")
    if not _current(kind, row):
        synth_type = f"sft.attempt.{kind}"  # not terminal for the CLI
    level = LEVELS.get(kind, "warning" if kind == "data" else "info")
    data = dict(event["data"] or {})
    if kind == "failed" and row["error"]:
        data.setdefault("detail", row["error"])
    return {
        "seq": event["seq"],
        "job_id": row["id"],
        "type": synth_type,
        "level": level,
        "message": event["message"],
        "created_at": iso(event["time"]),
        "data": data,
    }


def events_json(store: Store, row: dict[str, Any], since: int, limit: int) -> dict[str, Any]:
    events = store.events(row["id"], since, limit)
    return {
        "events": [event_json(row, e) for e in events],
        "next_seq": events[-1]["seq"] if events else since,
    }


def _all_events(store: Store, job_id: str) -> Iterator[dict[str, Any]]:
    after = 0
    while events := store.events(job_id, after, PAGE):
        yield from events
        after = events[-1]["seq"]


def metric_points(event: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``metrics.jsonl`` record (a progress or eval event) as metric points:
    ``loss`` -> ``train.loss``, ``eval/loss`` -> ``val.loss``."""
    prefix = METRIC_EVENTS[event["type"]]
    record = event["data"].get("metrics", {})
    step = record.get("step")
    points = []
    for key, value in record.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        points.append(
            {
                "name": f"{prefix}.{key.removeprefix('eval/')}",
                "value": value,
                "step": step,
                "phase": prefix,
                "created_at": iso(event["time"]),
                "data": {"total_steps": record.get("total_steps")},
            }
        )
    return points


def metrics_json(
    store: Store,
    row: dict[str, Any],
    after_step: int | None,
    name: str | None,
    limit: int,
) -> dict[str, Any]:
    """Points after ``after_step`` (the first ``limit``), or else the last ``limit``: the
    CLI's stream asks without a cursor and must see the newest."""
    points = [
        p
        for e in _all_events(store, row["id"])
        if e["type"] in METRIC_EVENTS
        for p in metric_points(e)
        if name is None or p["name"] == name
    ]
    if after_step is not None:
        points = [p for p in points if isinstance(p["step"], int) and p["step"] > after_step]
        return {"points": points[:limit]}
    return {"points": points[-limit:]}


def timeline_json(store: Store, row: dict[str, Any], limit: int) -> dict[str, Any]:
    """The job's state changes as phases; an old terminal phase (a resumed job's
    failure) is marked so that the CLI does not stop on it."""
    entries = []
    for e in _all_events(store, row["id"]):
        if e["type"] not in STATE_EVENTS:
            continue
        phase = STATUS_OF_STATE.get(e["type"], e["type"])
        if not _current(e["type"], row):
            phase = f"{e['type']} (resumed)"
        elif e["type"] == "interrupted":
            phase = "interrupted"  # the status, "failed", ends the CLI's stream
        entries.append(
            {
                "phase": phase,
                "job_id": row["id"],
                "message": e["message"],
                "created_at": iso(e["time"]),
            }
        )
    return {"events": entries[-limit:]}
