"""The job control plane from Python: trainer endpoints, TOML jobs, promotion.

A *trainer job* reserves a training endpoint for one base model and LoRA rank; pass
``endpoint.base_url`` to ``ServiceClient`` (or ``tinker.ServiceClient``) and the runs
it creates belong to the job, so their sampler checkpoints can be promoted to named
models. A *TOML job* is a whole recipe run by the server in a worker process; it reads
files uploaded with ``upload_file`` (``data = "file-<id>"``) or under folders the
server allows, and a config the server refuses raises ``JobRejected`` listing why.
"""

from __future__ import annotations

import builtins
import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vlmtune.protocol.files import DEFAULT_PURPOSE
from vlmtune.sdk.http import HttpTransport, RemoteError

MODEL_ID_RE = re.compile(r"^[a-z0-9-]{1,63}$")
TERMINAL_STATES = ("succeeded", "failed", "cancelled", "deleted")


@dataclass
class TrainerJobConfig:
    base_model: str
    lora_rank: int = 16
    learning_rate: float = 1e-4
    gradient_accumulation_steps: int = 1
    display_name: str | None = None
    training_shape_ref: str | None = None


@dataclass
class TrainerEndpoint:
    """A running trainer job; ``base_url`` is where its training clients connect."""

    job_id: str
    base_url: str
    state: str
    config: dict[str, Any] = field(default_factory=dict)


class JobRejected(RemoteError):
    """The server refused a TOML job's config; ``problems`` names each by its TOML key."""

    def __init__(self, status: int, message: str, problems: list[str]) -> None:
        super().__init__(status, message)
        self.problems = problems


def _answer(r: httpx.Response) -> Any:
    """The JSON of a successful response; ``JobRejected`` for a refused job config,
    ``RemoteError`` for any other refusal."""
    if r.status_code < 400:
        return r.json()
    try:
        body = r.json()
    except ValueError:
        raise RemoteError(r.status_code, r.text) from None
    detail = str(body.get("detail", r.text)) if isinstance(body, dict) else r.text
    if isinstance(body, dict) and isinstance(body.get("problems"), list):
        raise JobRejected(r.status_code, detail, [str(p) for p in body["problems"]])
    raise RemoteError(r.status_code, detail)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _endpoint(job: dict[str, Any]) -> TrainerEndpoint:
    return TrainerEndpoint(
        job["id"], job.get("base_url", ""), job["state"], job.get("config") or {}
    )


class JobsClient:
    """Every job on a server (trainer and TOML): list, show, events, cancel, resume."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.t = HttpTransport(base_url, api_key)

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        return self.t.get("/v1/jobs", **({"kind": kind} if kind else {}))["jobs"]

    def get(self, job_id: str) -> dict[str, Any]:
        return self.t.get(f"/v1/jobs/{job_id}")

    def submit_toml(
        self,
        config_toml: str,
        type_: str = "sft",
        overrides: builtins.list[str] | None = None,  # `list` is a method here
        name: str | None = None,
    ) -> dict[str, Any]:
        """Submit a TOML job; the server validates it first and raises ``JobRejected``
        (``problems``: each by its TOML key) instead of queueing a bad one."""
        body = {
            "config_toml": config_toml,
            "type": type_,
            "overrides": overrides or [],
            "name": name,
        }
        return _answer(self.t.client.post("/v1/jobs", json=body))

    # ---- uploaded files: what a TOML job's data = "file-<id>" names --------------------
    def upload_file(
        self, path: str | Path, purpose: str = DEFAULT_PURPOSE, reuse: bool = True
    ) -> dict[str, Any]:
        """Upload a file (``POST /v1/files``) and return it (``id``, ``bytes``,
        ``sha256``...). ``reuse``: a file already uploaded with the same bytes (SHA-256)
        and purpose is returned instead, with ``"reused": True``."""
        path = Path(path)
        if reuse:
            sha, size = sha256_of(path), path.stat().st_size
            for row in self.list_files(purpose):
                if row["sha256"] == sha and row["bytes"] == size:
                    return {**row, "reused": True}
        with path.open("rb") as f:  # httpx streams it
            r = self.t.client.post(
                "/v1/files", files={"file": (path.name, f)}, data={"purpose": purpose}
            )
        return _answer(r)

    def list_files(self, purpose: str | None = None) -> builtins.list[dict[str, Any]]:
        return self.t.get("/v1/files", **({"purpose": purpose} if purpose else {}))["data"]

    def get_file(self, file_id: str) -> dict[str, Any]:
        return self.t.get(f"/v1/files/{file_id}")

    def delete_file(self, file_id: str) -> dict[str, Any]:
        return self.t.request("DELETE", f"/v1/files/{file_id}")

    def events(self, job_id: str, after: int = 0, wait: float = 0.0) -> dict[str, Any]:
        """``{"job": ..., "events": [...]}``: the events after seq ``after``, waiting up to
        ``wait`` seconds for one. Each has ``seq``, ``time``, ``type``, ``message``, ``data``.
        ``progress`` and ``eval`` events are the run's ``metrics.jsonl`` records (SFT, DPO
        and RL alike), the record in ``data["metrics"]`` and ``step``, ``total`` (a
        progress event's; ``None`` if unknown), ``loss`` and ``accuracy`` (an eval's) next
        to it where recorded; ``log`` events are lines of the worker's stderr, for humans;
        the others (``running``, ``succeeded``, ``failed``, ...) are the job's life."""
        return self.t.get(f"/v1/jobs/{job_id}/events", after=after, wait=wait)

    def follow(
        self, job_id: str, poll_s: float = 10.0
    ) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
        """Yield ``(job, event)`` for each new event, then ``(job, None)`` once it ends."""
        after = 0
        while True:
            out = self.events(job_id, after, wait=poll_s)
            for event in out["events"]:
                after = event["seq"]
                yield out["job"], event
            if out["job"]["state"] in TERMINAL_STATES and not out["events"]:
                yield out["job"], None
                return

    def report_link(self, job_id: str) -> dict[str, Any]:
        """``{"url", "expires_at"}``: the job's report page, with a token a browser
        opens it by (no key needed, that page only, for a day)."""
        return self.t.get(f"/v1/jobs/{job_id}/report_link")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.t.post(f"/v1/jobs/{job_id}/cancel")

    def resume(self, job_id: str) -> dict[str, Any]:
        return self.t.post(f"/v1/jobs/{job_id}/resume")

    def delete(self, job_id: str) -> dict[str, Any]:
        return self.t.request("DELETE", f"/v1/jobs/{job_id}")

    def promote(self, job_id: str, checkpoint_id: str, output_model_id: str) -> dict[str, Any]:
        if not MODEL_ID_RE.match(output_model_id):
            raise ValueError(f"model id {output_model_id!r}: use 1-63 characters of a-z, 0-9 and -")
        body = {"checkpoint_id": checkpoint_id, "output_model_id": output_model_id}
        return self.t.post(f"/v1/jobs/{job_id}/promote", body)


class TrainerJobManager:
    """Create, list and delete trainer endpoints; promote their checkpoints to models."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.jobs = JobsClient(base_url, api_key)

    def create(self, config: TrainerJobConfig) -> TrainerEndpoint:
        return _endpoint(self.jobs.t.post("/v1/jobs/trainer", asdict(config)))

    def create_and_wait(self, config: TrainerJobConfig, timeout: float = 600.0) -> TrainerEndpoint:
        """Create a trainer job and return once it accepts training clients."""
        endpoint = self.create(config)
        deadline = time.monotonic() + timeout
        while endpoint.state != "running":
            if endpoint.state in TERMINAL_STATES or time.monotonic() > deadline:
                raise RuntimeError(
                    f"trainer job {endpoint.job_id} did not start (state {endpoint.state})"
                )
            time.sleep(1.0)
            endpoint = self.get(endpoint.job_id)
        return endpoint

    def get(self, job_id: str) -> TrainerEndpoint:
        return _endpoint(self.jobs.get(job_id))

    def list(self) -> list[TrainerEndpoint]:
        return [_endpoint(j) for j in self.jobs.list("trainer") if j["state"] != "deleted"]

    def delete(self, job_id: str) -> None:
        self.jobs.delete(job_id)

    def resolve_training_profile(self, shape_id: str) -> dict[str, Any]:
        """A training shape's settings; unknown ids raise ``KeyError`` naming the known ones."""
        try:
            return self.jobs.t.get(f"/v1/training_profiles/{shape_id}")
        except RemoteError as e:
            if e.status == 404:
                raise KeyError(e.message) from None
            raise

    def promote_checkpoint(
        self, job_id: str, checkpoint_id: str, output_model_id: str
    ) -> dict[str, Any]:
        """Turn a sampler checkpoint of the job into a model served by ``/v1/chat/completions``."""
        return self.jobs.promote(job_id, checkpoint_id, output_model_id)
