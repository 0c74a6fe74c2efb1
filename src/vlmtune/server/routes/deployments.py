"""Deployment sampling as the Fireworks training SDK drives it (its RL loops).

``/v1/accounts/{account}/deployments[/{id}]`` (create, get, patch, delete),
``/v1/accounts/{account}/deploymentShapes/{shape}/versions[/{v}]`` (what a deployment of
a training shape runs on), ``/hot_load/v1/models/hot_load`` (load a trainer's sampler
checkpoint onto a deployment, and its status; the deployment is named by the
``fireworks-deployment`` header) and ``/inference/v1/completions`` (sample from it).
An account is its tenant: a caller reaches only its own account's deployments (an
operator key, any account's); another's answer as unknown ones do.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import Field
from starlette.exceptions import HTTPException

from vlmtune.protocol.errors import BadRequest, NotFound, shown
from vlmtune.protocol.wire import WireModel
from vlmtune.server import fireworks as fw
from vlmtune.server.completions import (
    Answer,
    CompletionBody,
    complete,
    decoded_images,
    prompt_input,
)
from vlmtune.server.context import SafeJSON, body_of, caller, ctx, model_name
from vlmtune.server.deployments import (
    DeploymentPatch,
    Deployments,
    DeploymentSpec,
    parse_deployment_name,
    replica_status,
    resource,
)
from vlmtune.server.openapi import ErrorBody, json_body

router = APIRouter()

_ACCOUNT = Path(max_length=64, description="the caller's account (its tenant)")
_DEPLOYMENT = Path(max_length=63, description="the deployment id")
_HEADER = "fireworks-deployment"
_HEADER_PARAM = {
    "name": _HEADER,
    "in": "header",
    "required": True,
    "description": "accounts/{account}/deployments/{id}: the deployment to load onto",
    "schema": {"type": "string", "maxLength": 200},
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "the account has a deployment of that id"}
}
# One server-sent event: ``data`` is a JSON chunk, the last one ``[DONE]``.
_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}
_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a completion (JSON), or with stream=true server-sent events",
        "content": {"text/event-stream": {"schema": _EVENT}},
    }
}


class SnapshotDelta(WireModel):
    """What a delta hot-load says it builds on; full weights are loaded either way."""

    previous_snapshot_identity: str | None = Field(None, max_length=1000, description="echoed")
    compression_format: str | None = Field(None, max_length=64, description="ignored")
    checksum_format: str | None = Field(None, max_length=64, description="ignored")


class HotLoadBody(WireModel):
    identity: str = Field(
        min_length=1,
        max_length=1000,
        description="tinker://<run>/sampler_weights/<name>, or a sampler checkpoint name of "
        "the deployment's hotLoadTrainerJob",
    )
    reset_prompt_cache: bool = Field(True, description="accepted (there is no prompt cache)")
    incremental_snapshot_metadata: SnapshotDelta | None = Field(
        None, description="accepted: a delta save holds full weights here"
    )


def account_tenant(request: Request, account: str) -> str:
    """The tenant ``account`` names, if the caller may reach it; else unknown (404)."""
    tenant = fw.account_scope(caller(request), account)
    if tenant is None:
        raise NotFound(f"unknown account {shown(account)} (GET /v1/accounts names yours)")
    return tenant


def _deployments(request: Request) -> Deployments:
    c = ctx(request)
    return Deployments(c.store, c.samplers)


def _named(request: Request) -> dict[str, Any]:
    """The deployment the hot-load header names."""
    name = request.headers.get(_HEADER)
    if not name:
        raise BadRequest(f"header {_HEADER}: missing (accounts/<account>/deployments/<id>)")
    account, deployment_id = parse_deployment_name(name, f"header {_HEADER}")
    return _deployments(request).get(account_tenant(request, account), deployment_id)


# ---- deployments (query parameters keep the SDK's camelCase names) -------------------
@router.post(
    "/v1/accounts/{account}/deployments",
    openapi_extra=json_body(DeploymentSpec),
    responses=_CONFLICT,
)
async def create_deployment(
    request: Request,
    account: str = _ACCOUNT,
    deploymentId: str = Query(max_length=63, description="the new deployment's id"),
    skipShapeValidation: bool = Query(False, description="accepted"),
    acceptShapelessRisk: bool = Query(False, description="accepted"),
    disableSpeculativeDecoding: bool = Query(False, description="accepted"),
) -> SafeJSON:
    tenant = account_tenant(request, account)
    spec = await body_of(request, DeploymentSpec)
    served = model_name(request, spec.base_model)  # --model-alias
    row = await run_in_threadpool(_deployments(request).create, tenant, deploymentId, spec, served)
    if row is None:  # the SDK then reads the existing one
        raise HTTPException(409, f"deployment {deploymentId!r} already exists")
    return SafeJSON(resource(row))


@router.get("/v1/accounts/{account}/deployments/{deployment_id}")
async def get_deployment(
    request: Request, account: str = _ACCOUNT, deployment_id: str = _DEPLOYMENT
) -> SafeJSON:
    return SafeJSON(
        resource(_deployments(request).get(account_tenant(request, account), deployment_id))
    )


@router.patch(
    "/v1/accounts/{account}/deployments/{deployment_id}",
    openapi_extra=json_body(DeploymentPatch),
)
async def patch_deployment(
    request: Request,
    account: str = _ACCOUNT,
    deployment_id: str = _DEPLOYMENT,
    updateMask: str | None = Query(
        None,
        max_length=500,
        description="comma-separated fields to change (hot_load_trainer_job, ...); "
        "without it, every field the body sets",
    ),
) -> SafeJSON:
    tenant = account_tenant(request, account)
    patch = await body_of(request, DeploymentPatch)
    row = await run_in_threadpool(
        _deployments(request).patch, tenant, deployment_id, patch, updateMask
    )
    return SafeJSON(resource(row))


@router.delete("/v1/accounts/{account}/deployments/{deployment_id}")
async def delete_deployment(
    request: Request,
    account: str = _ACCOUNT,
    deployment_id: str = _DEPLOYMENT,
    ignoreChecks: bool = Query(False, description="accepted"),
    hard: bool = Query(False, description="accepted: deleting is always final"),
) -> SafeJSON:
    tenant = account_tenant(request, account)
    await run_in_threadpool(_deployments(request).delete, tenant, deployment_id)
    return SafeJSON({})


# ---- deployment shapes: each training shape's snapshot names one (the old cookbook reads
# its accelerator) ------------------------------------------------------------------------
@router.get("/v1/accounts/{account}/deploymentShapes/{shape}/versions/{version}")
async def deployment_shape_version(
    account: str = _ACCOUNT,
    shape: str = Path(max_length=128, description="a training shape's name"),
    version: str = Path(max_length=64, description=f"{fw.SHAPE_VERSION}: a shape has one"),
) -> SafeJSON:
    return SafeJSON(shape_version(account, shape, version))


@router.get("/v1/accounts/{account}/deploymentShapes/{shape}/versions")
async def deployment_shape_versions(
    account: str = _ACCOUNT,
    shape: str = Path(max_length=128, description="a training shape's name"),
    filter: str | None = Query(None, max_length=1000, description="accepted"),
    pageSize: int = Query(50, ge=0, le=1000, description="accepted"),
) -> SafeJSON:
    version = shape_version(account, shape, fw.SHAPE_VERSION)
    return SafeJSON({"deploymentShapeVersions": [version], "nextPageToken": ""})


def shape_version(account: str, shape: str, version: str) -> dict[str, Any]:
    """The deployment shape of a training shape (``deploymentShapeVersion`` in its
    snapshot): one of its accelerators, as a deployment here is one engine."""
    found = {p.name: p.shape for p in fw.published_shapes()}.get(shape)
    if found is None or version != fw.SHAPE_VERSION:
        raise NotFound(
            f"unknown deployment shape {shown(f'{shape}/versions/{version}')}: each training "
            f"shape has one, version {fw.SHAPE_VERSION} (vlmtune shapes)"
        )
    return {
        "name": f"accounts/{account}/deploymentShapes/{shape}/versions/{version}",
        "state": "STATE_READY",
        "validated": True,
        "snapshot": {
            "acceleratorType": fw.ACCELERATORS.get(found.gpu_type, found.gpu_type.upper()),
            "acceleratorCount": 1,
        },
    }


# ---- hot-load -------------------------------------------------------------------------
@router.post(
    "/hot_load/v1/models/hot_load",
    openapi_extra={**json_body(HotLoadBody), "parameters": [_HEADER_PARAM]},
)
async def hot_load(request: Request) -> SafeJSON:
    body = await body_of(request, HotLoadBody)
    row = await run_in_threadpool(_named, request)
    row = await _deployments(request).hot_load(row, body.identity)
    return SafeJSON(replica_status(row))


@router.get("/hot_load/v1/models/hot_load", openapi_extra={"parameters": [_HEADER_PARAM]})
async def hot_load_status(request: Request) -> SafeJSON:
    return SafeJSON(replica_status(await run_in_threadpool(_named, request)))


# ---- inference ------------------------------------------------------------------------
@router.post(
    "/inference/v1/completions",
    response_model=None,
    openapi_extra=json_body(CompletionBody),
    responses=_STREAM,
)
async def completions(request: Request) -> SafeJSON | StreamingResponse:
    c = ctx(request)
    body = await body_of(request, CompletionBody)
    body.check_supported()
    account, deployment_id = parse_deployment_name(body.model, "model")
    deployments = _deployments(request)
    row = deployments.get(account_tenant(request, account), deployment_id)
    sampler = await run_in_threadpool(deployments.serving, row)
    validator = await run_in_threadpool(c.samplers.validator, sampler)
    images = await run_in_threadpool(decoded_images, body.images)
    prompt = None  # a text prompt is tokenized by the engine's tokenizer, on its thread
    if isinstance(body.prompt, list):
        prompt = await run_in_threadpool(prompt_input, body.prompt, images, validator)
    key, loader = c.samplers.pool_engine(sampler)
    start = time.monotonic()
    fut = c.pool.run(key, loader, lambda e: complete(e, body, prompt, images, validator))
    try:
        result = await asyncio.wrap_future(fut)
    except ValueError as e:  # the engine's refusals (and BadRequest) are the client's
        raise BadRequest(str(e)) from None
    answer = Answer(body, result, time.monotonic() - start)
    if body.stream:
        return StreamingResponse(answer.events(), media_type="text/event-stream")
    return SafeJSON(answer.json())
