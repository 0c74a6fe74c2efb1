"""The job control plane: trainer endpoints, TOML jobs, events, promotion, profiles.

Job routes are vlmtune's own (``/v1/jobs``). A trainer job's endpoint is this same
server under ``/trainer/<job_id>``: a Tinker client pointed there creates runs that
belong to the job (``app.py`` strips the prefix and tags the request).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from vlmtune.config import ConfigError
from vlmtune.protocol.bodies import MAX_GRADIENT_ACCUMULATION, MAX_LORA_RANK, MAX_NAME_CHARS
from vlmtune.protocol.errors import clipped
from vlmtune.protocol.wire import INT64_MAX, WireModel
from vlmtune.server.context import SafeJSON, body_of, caller, ctx, tenant_of
from vlmtune.server.jobs import TERMINAL, resolve_profile
from vlmtune.server.openapi import json_body

router = APIRouter()
MAX_PROBLEMS = 200  # problems listed for one refused job config
MAX_EVENT_WAIT_S = 30.0  # the longest one events request is held open


class TrainerJobBody(WireModel):
    """A trainer endpoint's settings, bounded as ``create_model``'s (``MAX_LORA_RANK``)."""

    base_model: str = Field(min_length=1, max_length=4096)  # a hub id or a local directory
    lora_rank: int = Field(16, ge=0, le=MAX_LORA_RANK)
    learning_rate: float = Field(1e-4, gt=0, allow_inf_nan=False)
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_GRADIENT_ACCUMULATION)
    display_name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    training_shape_ref: str | None = Field(None, max_length=MAX_NAME_CHARS)


class TomlJobBody(WireModel):
    """A TOML job: checked as `vlmtune train` checks one, then queued."""

    config_toml: str = Field(description="the job file's text (paths: uploads or allowed folders)")
    type: str = Field("sft", max_length=16, description="sft, dpo or rl")
    overrides: list[str] = Field(
        [], max_length=256, description="section.key=value, applied before validation"
    )
    name: str | None = Field(None, max_length=MAX_NAME_CHARS, description="default: job.name")


class PromoteBody(WireModel):
    checkpoint_id: str = "final"
    output_model_id: str


def job_json(request: Request, row: dict[str, Any]) -> dict[str, Any]:
    out = {
        k: row[k]
        for k in (
            "id",
            "kind",
            "name",
            "state",
            "config",
            "model_id",
            "error",
            "exit_code",
            "created",
            "updated",
        )
    }
    if row["kind"] == "trainer":
        out["base_url"] = f"{str(request.base_url).rstrip('/')}/trainer/{row['id']}"
    return out


@router.post("/v1/jobs/trainer", openapi_extra=json_body(TrainerJobBody))
async def create_trainer_job(request: Request) -> SafeJSON:
    body = await body_of(request, TrainerJobBody)
    row = await run_in_threadpool(
        ctx(request).jobs.create_trainer, body.model_dump(), caller(request).tenant
    )
    return SafeJSON(job_json(request, row))


def config_error_json(e: ConfigError) -> SafeJSON:
    """A refused job config: a 400 like every invalid request here, whose ``problems``
    lists each problem (by TOML key) for clients to show one by one."""
    message = clipped(str(e))
    problems = [clipped(p) for p in e.problems[:MAX_PROBLEMS]]
    body = {"detail": message, "problems": problems,
            "error": {"message": message, "type": "invalid_request_error"}}  # fmt: skip
    return SafeJSON(body, 400)


@router.post("/v1/jobs", openapi_extra=json_body(TomlJobBody))
async def submit_toml_job(request: Request) -> SafeJSON:
    """Validate the job as `vlmtune train` does, confine its paths (uploads and the
    allowed folders; see ``server/job_access.py``) and queue it. A job with problems is
    answered 400 with every one in ``problems`` and ``detail``, and nothing is queued."""
    body = await body_of(request, TomlJobBody)
    c = ctx(request)
    tenant = caller(request).tenant
    try:
        row = await run_in_threadpool(
            lambda: c.jobs.submit_toml(
                body.config_toml, body.type, body.overrides, body.name, tenant=tenant
            )
        )
    except ConfigError as e:
        return config_error_json(e)
    return SafeJSON(job_json(request, row))


@router.get("/v1/jobs")
async def list_jobs(
    request: Request, kind: str | None = Query(None, max_length=64, description="trainer or toml")
) -> SafeJSON:
    jobs = ctx(request).jobs.list(kind, tenant_of(request))
    return SafeJSON({"jobs": [job_json(request, r) for r in jobs]})


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> SafeJSON:
    return SafeJSON(job_json(request, ctx(request).jobs.get(job_id, tenant_of(request))))


@router.get("/v1/jobs/{job_id}/events")
async def job_events(
    job_id: str,
    request: Request,
    after: int = Query(0, ge=0, le=INT64_MAX, description="the last event seq already seen"),
    wait: float = Query(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description=f"seconds to hold for new events (more than {MAX_EVENT_WAIT_S} counts as that)",
    ),
) -> SafeJSON:
    """Events after ``after``; with ``wait`` > 0, hold up to that many seconds for new ones."""
    c = ctx(request)
    job = c.jobs.get(job_id, tenant_of(request))
    deadline = asyncio.get_running_loop().time() + min(wait, MAX_EVENT_WAIT_S)
    events = c.store.events(job_id, after)
    while (
        not events and job["state"] not in TERMINAL and asyncio.get_running_loop().time() < deadline
    ):
        await asyncio.sleep(0.25)
        events = c.store.events(job_id, after)
        job = c.jobs.get(job_id)
    return SafeJSON({"job": job_json(request, c.jobs.get(job_id)), "events": events})


@router.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> SafeJSON:
    row = await run_in_threadpool(ctx(request).jobs.cancel, job_id, tenant_of(request))
    return SafeJSON(job_json(request, row))


@router.post("/v1/jobs/{job_id}/resume")
async def resume_job(job_id: str, request: Request) -> SafeJSON:
    row = await run_in_threadpool(ctx(request).jobs.resume, job_id, tenant_of(request))
    return SafeJSON(job_json(request, row))


@router.delete("/v1/jobs/{job_id}")
async def delete_job(job_id: str, request: Request) -> SafeJSON:
    row = await run_in_threadpool(ctx(request).jobs.delete, job_id, tenant_of(request))
    return SafeJSON(job_json(request, row))


@router.post("/v1/jobs/{job_id}/promote", openapi_extra=json_body(PromoteBody))
async def promote(job_id: str, request: Request) -> SafeJSON:
    body = await body_of(request, PromoteBody)
    row = await run_in_threadpool(
        ctx(request).jobs.promote,
        job_id,
        body.checkpoint_id,
        body.output_model_id,
        tenant_of(request),
    )
    return SafeJSON(
        {"id": row["id"], "object": "model", "path": row["path"], "base_model": row["base_model"]}
    )


@router.get("/v1/training_profiles/{shape_id}")
async def training_profile(shape_id: str) -> SafeJSON:
    return SafeJSON(resolve_profile(shape_id))
