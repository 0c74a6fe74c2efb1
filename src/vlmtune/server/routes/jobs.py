"""The job control plane: trainer endpoints, TOML jobs, events, promotion, profiles.

Job routes are vlmtune's own (``/v1/jobs``). A trainer job's endpoint is this same
server under ``/trainer/<job_id>``: a Tinker client pointed there creates runs that
belong to the job (``app.py`` strips the prefix and tags the request).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from vlmtune.protocol.wire import WireModel
from vlmtune.server.context import SafeJSON, body_of, ctx
from vlmtune.server.jobs import TERMINAL, resolve_profile

router = APIRouter()


class TrainerJobBody(WireModel):
    base_model: str
    lora_rank: int = 16
    learning_rate: float = 1e-4
    gradient_accumulation_steps: int = 1
    display_name: str | None = None
    training_shape_ref: str | None = None


class TomlJobBody(WireModel):
    config_toml: str
    type: str = "sft"
    overrides: list[str] = []
    name: str | None = None


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


@router.post("/v1/jobs/trainer")
async def create_trainer_job(request: Request) -> SafeJSON:
    body = await body_of(request, TrainerJobBody)
    row = await run_in_threadpool(ctx(request).jobs.create_trainer, body.model_dump())
    return SafeJSON(job_json(request, row))


@router.post("/v1/jobs")
async def submit_toml_job(request: Request) -> SafeJSON:
    body = await body_of(request, TomlJobBody)
    c = ctx(request)
    row = await run_in_threadpool(
        c.jobs.submit_toml, body.config_toml, body.type, body.overrides, body.name
    )
    return SafeJSON(job_json(request, row))


@router.get("/v1/jobs")
async def list_jobs(request: Request, kind: str | None = None) -> SafeJSON:
    return SafeJSON({"jobs": [job_json(request, r) for r in ctx(request).jobs.list(kind)]})


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> SafeJSON:
    return SafeJSON(job_json(request, ctx(request).jobs.get(job_id)))


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, after: int = 0, wait: float = 0.0) -> SafeJSON:
    """Events after ``after``; with ``wait`` > 0, hold up to that many seconds for new ones."""
    c = ctx(request)
    job = c.jobs.get(job_id)
    deadline = asyncio.get_running_loop().time() + min(max(wait, 0.0), 30.0)
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
    row = await run_in_threadpool(ctx(request).jobs.cancel, job_id)
    return SafeJSON(job_json(request, row))


@router.post("/v1/jobs/{job_id}/resume")
async def resume_job(job_id: str, request: Request) -> SafeJSON:
    row = await run_in_threadpool(ctx(request).jobs.resume, job_id)
    return SafeJSON(job_json(request, row))


@router.delete("/v1/jobs/{job_id}")
async def delete_job(job_id: str, request: Request) -> SafeJSON:
    row = await run_in_threadpool(ctx(request).jobs.delete, job_id)
    return SafeJSON(job_json(request, row))


@router.post("/v1/jobs/{job_id}/promote")
async def promote(job_id: str, request: Request) -> SafeJSON:
    body = await body_of(request, PromoteBody)
    row = await run_in_threadpool(
        ctx(request).jobs.promote, job_id, body.checkpoint_id, body.output_model_id
    )
    return SafeJSON(
        {"id": row["id"], "object": "model", "path": row["path"], "base_model": row["base_model"]}
    )


@router.get("/v1/training_profiles/{shape_id}")
async def training_profile(shape_id: str) -> SafeJSON:
    return SafeJSON(resolve_profile(shape_id))
