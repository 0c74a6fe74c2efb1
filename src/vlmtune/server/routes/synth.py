"""The hosted Qwen3-VL trainer's CLI routes (``synth-ai`` 0.2.x, ``--backend URL``):
uploads and learning jobs, over the file store and the TOML jobs (``server/synth.py``).

The CLI sends ``Authorization: Bearer $SYNTH_API_KEY``: a key of this server.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from vlmtune.config import ConfigError
from vlmtune.protocol.bodies import MAX_NAME_CHARS
from vlmtune.protocol.errors import BadRequest
from vlmtune.protocol.wire import INT64_MAX, WireModel
from vlmtune.server import synth
from vlmtune.server.context import SafeJSON, body_of, caller, ctx, model_name, tenant_of
from vlmtune.server.openapi import json_body
from vlmtune.server.routes.files import MULTIPART_BODY, stream_upload
from vlmtune.server.routes.jobs import config_error_json

router = APIRouter()
MAX_LIMIT = 1000  # events, points or phases in one answer


class LearningJobBody(WireModel):
    """``POST /api/learning/jobs`` as the CLI builds it (``build_sft_payload``)."""

    model: str = Field(min_length=1, max_length=4096, description="e.g. Qwen/Qwen3-VL-4B-Instruct")
    training_type: str = Field(
        "sft_offline", max_length=32, description="sft_offline (or fft, qft)"
    )
    training_file_id: str | None = Field(None, max_length=64, description="an upload's id")
    hyperparameters: dict[str, Any] = Field(
        {}, description="[hyperparameters], as the CLI copies it"
    )
    metadata: dict[str, Any] = Field(
        {}, description="effective_config: [compute], [data] and [training] as the CLI copies them"
    )
    validation_file: str | None = Field(None, max_length=64, description="an upload's id")
    suffix: str | None = Field(None, max_length=MAX_NAME_CHARS, description="the model's name")


async def _upload(request: Request) -> SafeJSON:
    """Stream the upload to the file store, then read it as training will; a file with
    no trainable row is refused (and removed), one with some has its drops reported."""
    row = await stream_upload(request)
    if synth.needs_check(row["purpose"]):
        try:
            await run_in_threadpool(synth.check_upload, row)
        except BadRequest:
            await run_in_threadpool(ctx(request).jobs.files.delete, row["id"])
            raise
    return SafeJSON(synth.synth_file_json(row))


@router.post("/api/files", openapi_extra=MULTIPART_BODY)
async def upload_file(request: Request) -> SafeJSON:
    """The CLI's upload (``file``, ``purpose=fine-tune``); rows checked on arrival."""
    return await _upload(request)


@router.post("/api/learning/files", openapi_extra=MULTIPART_BODY)
async def upload_learning_file(request: Request) -> SafeJSON:
    """The SDK's upload (``LearningClient.upload_training_file``): the same."""
    return await _upload(request)


@router.get("/api/files/{file_id}")
async def get_file(file_id: str, request: Request) -> SafeJSON:
    row = ctx(request).jobs.files.get(file_id, tenant_of(request))
    return SafeJSON(synth.synth_file_json(row))


@router.get("/api/learning/files/{file_id}")
async def get_learning_file(file_id: str, request: Request) -> SafeJSON:
    return await get_file(file_id, request)


@router.post("/api/learning/jobs", openapi_extra=json_body(LearningJobBody))
async def create_job(request: Request) -> SafeJSON:
    """Validate and queue the job (a TOML job; the CLI starts every job it creates at
    once). A refused one is a 400 listing every problem, and nothing is queued."""
    body = await body_of(request, LearningJobBody)
    c = ctx(request)
    sent = body.model_dump(exclude_none=True)
    try:
        row = await run_in_threadpool(
            synth.create_job, c.jobs, sent, model_name(request, body.model), caller(request).tenant
        )
    except ConfigError as e:
        return config_error_json(e)
    return SafeJSON(synth.job_json(c.jobs.dir, row))


@router.post("/api/learning/jobs/{job_id}/start")
async def start_job(job_id: str, request: Request) -> SafeJSON:
    c = ctx(request)
    row = await run_in_threadpool(synth.start, c.jobs, job_id, tenant_of(request))
    return SafeJSON(synth.job_json(c.jobs.dir, row))


@router.get("/api/learning/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> SafeJSON:
    c = ctx(request)
    return SafeJSON(
        synth.job_json(c.jobs.dir, synth.learning_job(c.jobs, job_id, tenant_of(request)))
    )


@router.get("/api/learning/jobs/{job_id}/events")
async def job_events(
    job_id: str,
    request: Request,
    since_seq: int = Query(0, ge=0, le=INT64_MAX, description="the last event seq already seen"),
    limit: int = Query(200, ge=1, le=MAX_LIMIT),
) -> SafeJSON:
    c = ctx(request)
    row = synth.learning_job(c.jobs, job_id, tenant_of(request))
    return SafeJSON(synth.events_json(c.store, row, since_seq, limit))


@router.get("/api/learning/jobs/{job_id}/metrics")
async def job_metrics(
    job_id: str,
    request: Request,
    after_step: int | None = Query(None, ge=-1, le=INT64_MAX, description="points after it"),
    name: str | None = Query(None, max_length=128, description="e.g. train.loss"),
    limit: int = Query(500, ge=1, le=MAX_LIMIT),
    run_id: str | None = Query(None, max_length=128, description="accepted; a job has one run"),
) -> SafeJSON:
    c = ctx(request)
    row = synth.learning_job(c.jobs, job_id, tenant_of(request))
    points = await run_in_threadpool(synth.metrics_json, c.store, row, after_step, name, limit)
    return SafeJSON(points)


@router.get("/api/learning/jobs/{job_id}/timeline")
async def job_timeline(
    job_id: str, request: Request, limit: int = Query(200, ge=1, le=MAX_LIMIT)
) -> SafeJSON:
    c = ctx(request)
    row = synth.learning_job(c.jobs, job_id, tenant_of(request))
    return SafeJSON(await run_in_threadpool(synth.timeline_json, c.store, row, limit))
