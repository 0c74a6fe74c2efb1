"""The service half of the Tinker protocol (sessions, client config, listings) and extensions.

The ``tinker`` client opens with ``/api/v1/client/config`` (feature flags: this server
asks for plain httpx, uncompressed protobuf and per-request polling), creates a
session, heartbeats it every 10 s and sends telemetry; all are answered here. Runs
and checkpoints are listed from the database, so they survive restarts.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from vlmtune.defaults import image_cap
from vlmtune.protocol.bodies import (
    CreateSessionBody,
    ModelIdBody,
    SamplingSessionBody,
    SessionBody,
)
from vlmtune.protocol.errors import BadRequest, NotFound, shown
from vlmtune.protocol.paths import checkpoint_id, tinker_path
from vlmtune.protocol.wire import INT64_MAX, WireModel
from vlmtune.server.catalog import available_base_models
from vlmtune.server.context import (
    SafeJSON,
    ServerContext,
    body_of,
    caller,
    ctx,
    model_name,
    tenant_of,
)
from vlmtune.server.openapi import json_body
from vlmtune.server.run_config import engine_config

router = APIRouter()

CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "credential_default_source": "api_key",
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    "parallel_fwdbwd_chunks": True,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
    "sample_enable_stuck_detection": True,
}


MAX_PAGE = 1000  # runs in one listing page


class ImageTokenBody(WireModel):
    base_model: str | None = None
    model_id: str | None = None
    min_pixels: int | None = Field(None, ge=0, le=INT64_MAX)
    max_pixels: int | None = Field(None, ge=0, le=INT64_MAX)
    images: list[dict[str, Any]]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


@router.get("/healthz")
@router.get("/v1/health")
@router.get("/api/v1/healthz")
async def healthz() -> SafeJSON:
    return SafeJSON({"status": "ok"})


@router.post("/api/v1/client/config")
async def client_config() -> SafeJSON:
    return SafeJSON(CLIENT_CONFIG)


@router.post("/api/v1/client/dynamic_config")
async def client_dynamic_config() -> SafeJSON:
    return SafeJSON({"refresh_interval_sec": 300, "sample_cancel_enabled": False})


@router.post("/api/v1/telemetry")
async def telemetry() -> SafeJSON:
    return SafeJSON({"status": "accepted"})  # accepted and dropped: nothing leaves this host


@router.post("/api/v1/create_session", openapi_extra=json_body(CreateSessionBody, required=False))
async def create_session(request: Request) -> SafeJSON:
    sid = f"sess-{uuid.uuid4().hex[:16]}"
    raw = await request.body()
    ctx(request).store.add_session(sid, {"bytes": len(raw)}, caller(request).tenant)
    return SafeJSON({"type": "create_session", "session_id": sid})


@router.post("/api/v1/session_heartbeat", openapi_extra=json_body(SessionBody))
async def session_heartbeat(request: Request) -> SafeJSON:
    body = await body_of(request, SessionBody)
    if not ctx(request).store.touch_session(body.session_id, tenant=tenant_of(request)):
        raise NotFound(f"unknown session {shown(body.session_id)}")
    return SafeJSON({"type": "session_heartbeat"})


@router.post("/api/v1/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request) -> SafeJSON:
    # As for an unknown session, finishing another tenant's does nothing and says nothing.
    ctx(request).store.touch_session(session_id, status="finished", tenant=tenant_of(request))
    return SafeJSON({})


@router.get("/api/v1/get_server_capabilities")
async def capabilities(request: Request) -> SafeJSON:
    models = await run_in_threadpool(available_base_models)
    return SafeJSON(
        {
            "supported_models": [
                {
                    "model_name": name,
                    "max_context_length": ctx_len,
                    "trainable": True,
                    "sampleable": True,
                }
                for name, ctx_len in models
            ]
        }
    )


@router.post("/api/v1/create_sampling_session", openapi_extra=json_body(SamplingSessionBody))
async def create_sampling_session(request: Request) -> SafeJSON:
    c = ctx(request)
    body = await body_of(request, SamplingSessionBody)
    who = caller(request)
    sampler = await run_in_threadpool(
        c.samplers.create,
        body.model_path,
        body.base_model and model_name(request, body.base_model),
        who.tenant,
        who.sees,
    )
    validator = await run_in_threadpool(c.samplers.validator, sampler)
    configured = (
        c.runs.get(sampler.run_id).config.max_images_per_message if sampler.run_id else None
    )
    cap = image_cap(sampler.base_model, configured)  # resolved (null: no cap), as get_info
    return SafeJSON(
        {
            "type": "create_sampling_session",
            "sampling_session_id": sampler.id,
            "model_name": sampler.base_model,  # vlmtune: what a client needs to render locally
            "vlmtune": {
                "min_pixels": validator.min_pixels,
                "max_pixels": validator.max_pixels,
                "max_images_per_message": cap,
            },
        }
    )


@router.get("/api/v1/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, request: Request) -> SafeJSON:
    s = ctx(request).samplers.get(sampler_id, tenant_of(request))
    path = None if s.kind != "path" else s.path
    return SafeJSON({"sampler_id": s.id, "base_model": s.base_model, "model_path": path})


def _checkpoint_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "checkpoint_id": checkpoint_id(row["kind"], row["name"]),
        "checkpoint_type": row["kind"],
        "time": _iso(row["created"]),
        "tinker_path": tinker_path(row["run_id"], row["kind"], row["name"]),
        "public": False,
        "user_metadata": {k: str(v) for k, v in (row.get("user_metadata") or {}).items()},
        "vlmtune": {"step": row["step"], "checkpoint_type": row["checkpoint_type"]},
    }


def _run_json(c: ServerContext, row: dict[str, Any]) -> dict[str, Any]:
    ckpts = c.store.checkpoints(row["id"])
    last = {
        k: next((x for x in reversed(ckpts) if x["kind"] == k), None)
        for k in ("training", "sampler")
    }
    return {
        "training_run_id": row["id"],
        "base_model": row["base_model"],
        "model_owner": "local",
        "is_lora": row["lora_rank"] > 0,
        "corrupted": False,
        "lora_rank": row["lora_rank"] or None,
        "last_request_time": _iso(row["last_request"]),
        "last_checkpoint": _checkpoint_json(last["training"]) if last["training"] else None,
        "last_sampler_checkpoint": _checkpoint_json(last["sampler"]) if last["sampler"] else None,
        "user_metadata": {k: str(v) for k, v in (row.get("user_metadata") or {}).items()},
        "vlmtune": {
            "step": row["step"],
            "job_id": row["job_id"],
            "loaded": row["id"] in c.runs.runs,
        },
    }


@router.get("/api/v1/training_runs")
async def list_runs(
    request: Request,
    limit: int = Query(20, ge=0, le=MAX_PAGE, description=f"runs per page (at most {MAX_PAGE})"),
    offset: int = Query(0, ge=0, le=INT64_MAX, description="runs to skip, newest first"),
) -> SafeJSON:
    c = ctx(request)
    rows, total = c.store.runs_page(limit, offset, tenant_of(request))
    return SafeJSON(
        {
            "training_runs": [_run_json(c, r) for r in rows],
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }
    )


@router.get("/api/v1/training_runs/{run_id}")
async def get_run(run_id: str, request: Request) -> SafeJSON:
    c = ctx(request)
    row = c.store.run(run_id, tenant=tenant_of(request))
    if row is None:
        raise NotFound(f"unknown training run {shown(run_id)}")
    return SafeJSON(_run_json(c, row))


@router.get("/api/v1/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, request: Request) -> SafeJSON:
    c = ctx(request)
    if c.store.run(run_id, include_deleted=True, tenant=tenant_of(request)) is None:
        raise NotFound(f"unknown training run {shown(run_id)}")
    return SafeJSON(
        {"checkpoints": [_checkpoint_json(r) for r in c.store.checkpoints(run_id)], "cursor": None}
    )


@router.post("/api/v1/unload_model", openapi_extra=json_body(ModelIdBody))
async def unload_model(request: Request) -> SafeJSON:
    body = await body_of(request, ModelIdBody)
    c = ctx(request)
    if c.store.run(body.model_id, include_deleted=True, tenant=tenant_of(request)) is None:
        raise NotFound(f"unknown model id {shown(body.model_id)}")
    c.runs.unload(body.model_id)  # its checkpoints stay; it reloads on next use
    return SafeJSON({"type": "unload_model", "model_id": body.model_id})


@router.post("/api/v1/image_token_count", openapi_extra=json_body(ImageTokenBody))
@router.post("/v1/image_token_count", openapi_extra=json_body(ImageTokenBody))
async def image_token_count(request: Request) -> SafeJSON:
    """How many ``<|image_pad|>`` tokens each image becomes for a run or a base model."""
    c = ctx(request)
    body = await body_of(request, ImageTokenBody)
    if body.model_id is not None:
        config = c.runs.get(body.model_id, tenant_of(request)).config
    elif body.base_model is not None:
        overrides = {
            k: v for k, v in (("min_pixels", body.min_pixels), ("max_pixels", body.max_pixels)) if v
        }
        base = model_name(request, body.base_model)
        config = await run_in_threadpool(engine_config, base, 0, overrides)
    else:
        raise BadRequest("give model_id (a training run) or base_model")
    validator = await run_in_threadpool(c.runs.validator, config)

    def count(i: int, image: dict[str, Any]) -> int:
        if "data" in image:
            try:
                data = base64.b64decode(str(image["data"]), validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(f"images[{i}].data is not valid base64") from None
            return validator.image_tokens(data, f"images[{i}]")
        w, h = image.get("width"), image.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise BadRequest(f"images[{i}]: give data (base64) or positive width and height")
        try:
            return int(validator.preprocessor.num_tokens(w, h))
        except ValueError as e:
            raise BadRequest(f"images[{i}]: {e}") from None

    tokens = await run_in_threadpool(lambda: [count(i, im) for i, im in enumerate(body.images)])
    return SafeJSON(
        {"tokens": tokens, "min_pixels": validator.min_pixels, "max_pixels": validator.max_pixels}
    )
