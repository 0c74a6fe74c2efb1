"""The Fireworks training control plane: ``/v1/accounts/{account}/...``.

What the official ``fireworks-ai[training]`` client and the Fireworks cookbook call
before and around training (``server/fireworks.py`` says which vlmtune object each
resource is): the account, training shapes, ``rlorTrainerJobs`` (create, get, delete,
``:cancel``, ``:resume``, their checkpoints), checkpoint ``:promote`` and models. The
trainer itself is reached at ``/training/v1/rlorTrainerJobs/{account}/{job}/api/v1/...``
(``app.py`` strips the prefix: the Tinker routes, runs tagged with the job).

``{account}`` is the caller's tenant (``GET /v1/accounts``); an operator key may name
any tenant's. Any other account is unknown, answered as one that does not exist.
Shapes and base models are served whatever the account segment says (``fireworks``,
the caller's, ``-``). Errors are 4xx with ``error.message``, never a 5xx for a
permanent problem: the client retries 5xx for minutes.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import Field
from starlette.exceptions import HTTPException

from vlmtune.protocol.bodies import MAX_LORA_RANK, MAX_NAME_CHARS
from vlmtune.protocol.errors import BadRequest, NotFound, shown
from vlmtune.protocol.wire import WireModel
from vlmtune.server import fireworks as fw
from vlmtune.server.catalog import HOSTED_BASE_ACCOUNT, HOSTED_MODEL_RE
from vlmtune.server.context import SafeJSON, body_of, caller, ctx, model_name
from vlmtune.server.jobs import JobExists
from vlmtune.server.openapi import ErrorBody, json_body

router = APIRouter()
MAX_PAGE = 1000
# Query parameters keep the wire's camelCase names (the schema declares them as sent).
PageSize = Query(50, ge=1, le=MAX_PAGE, description="rows per page")
PageToken = Query("", max_length=32, description="the last page's nextPageToken")
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "the id is taken (the client then GETs it)"}
}


class TrainingConfigBody(WireModel):
    """``trainingConfig`` of a create request (the fields vlmtune reads)."""

    base_model: str = Field(
        min_length=1, max_length=4096, alias="baseModel",
        description="accounts/fireworks/models/<id>, a hub id, or a --model-alias name",
    )  # fmt: skip
    lora_rank: int = Field(
        0, ge=0, le=MAX_LORA_RANK, alias="loraRank",
        description="0: every weight trains",
    )  # fmt: skip
    learning_rate: float = Field(
        1e-4, gt=0, allow_inf_nan=False, alias="learningRate",
        description="the job's default (optim_step sends its own)",
    )  # fmt: skip
    max_context_length: int | None = Field(
        None, ge=1, le=1 << 24, alias="maxContextLength",
        description="tokens per row when no training shape sets it",
    )  # fmt: skip


class TrainerJobCreateBody(WireModel):
    """An ``rlorTrainerJob`` create body (camelCase, as the client sends it; placement
    fields such as acceleratorType, nodeCount or region are the server's own here)."""

    training_config: TrainingConfigBody = Field(alias="trainingConfig")
    display_name: str | None = Field(None, max_length=MAX_NAME_CHARS, alias="displayName")
    forward_only: bool = Field(
        False, alias="forwardOnly",
        description="a reference trainer: forward passes only",
    )  # fmt: skip


class PromoteCheckpointBody(WireModel):
    """``:promote``'s body, snake_case as the client sends it (``async_promotion`` is
    accepted and moot: the answer is the model, at once)."""

    output_model: str = Field(
        max_length=MAX_NAME_CHARS, description="accounts/<account>/models/<id>"
    )
    trainer_job_id: str = Field(
        max_length=MAX_NAME_CHARS,
        description="accounts/<account>/rlorTrainerJobs/<job>, or the job id",
    )
    base_model: str | None = Field(
        None, max_length=4096, description="recorded by the client; the run's base is used"
    )


def _scope(request: Request, account: str) -> str:
    """The tenant ``accounts/{account}`` reaches for the caller, or an unknown account."""
    tenant = fw.account_scope(caller(request), account)
    if tenant is None:
        raise NotFound(f"unknown account {shown(account)} (GET /v1/accounts names yours)")
    return tenant


def _trainer(request: Request, account: str, job_id: str) -> dict[str, Any]:
    row = ctx(request).store.job(job_id, _scope(request, account))
    if row is None or row["kind"] != "trainer":
        raise NotFound(f"unknown rlorTrainerJob {shown(job_id)}")
    return row


# ---- accounts and shapes -----------------------------------------------------------------
@router.get("/v1/accounts")
async def list_accounts(
    request: Request, pageSize: int = PageSize, pageToken: str = PageToken
) -> SafeJSON:
    """Exactly one account, the caller's tenant (the client refuses two)."""
    rows, token = fw.page([fw.account_resource(caller(request).tenant)], pageSize, pageToken)
    return SafeJSON({"accounts": rows, "nextPageToken": token, "totalSize": 1})


@router.get("/v1/accounts/{account}/trainingShapes/{shape}/versions")
async def list_shape_versions(
    account: str,
    shape: str,
    filter: str = Query("", max_length=2000, description="clauses joined by AND"),
    orderBy: str = Query("", max_length=200, description="accepted (shapes share one time)"),
    pageSize: int = PageSize,
    pageToken: str = PageToken,
) -> SafeJSON:
    """A shape's versions (one: ``v1``), or every shape's with ``-`` for the shape."""
    shapes = fw.published_shapes() if shape == "-" else [fw.find_shape(shape)]
    keep = fw.version_filter(filter)
    versions = [v for v in map(fw.shape_version, shapes) if keep(v)]
    rows, token = fw.page(versions, pageSize, pageToken)
    return SafeJSON(
        {"trainingShapeVersions": rows, "nextPageToken": token, "totalSize": len(versions)}
    )


@router.get("/v1/accounts/{account}/trainingShapes/{shape}/versions/{version}")
async def get_shape_version(account: str, shape: str, version: str) -> SafeJSON:
    return SafeJSON(fw.shape_version(fw.find_shape(shape, version)))


# ---- trainer jobs ------------------------------------------------------------------------
@router.post(
    "/v1/accounts/{account}/rlorTrainerJobs",
    openapi_extra=json_body(TrainerJobCreateBody),
    responses=_CONFLICT,
)
async def create_trainer_job(
    account: str,
    request: Request,
    trainingShape: str = Query(
        "", max_length=MAX_NAME_CHARS,
        description="accounts/<a>/trainingShapes/<s>[/versions/<v>]; none: chosen by model",
    ),
    rlorTrainerJobId: str = Query("", max_length=63, description="the client's id (a-z 0-9 -)"),
) -> SafeJSON:  # fmt: skip
    """A trainer endpoint, running (and its healthz answering) as soon as this returns.
    A taken id is a 409 (the client then reads the job and reuses it)."""
    tenant = _scope(request, account)
    body = await body_of(request, TrainerJobCreateBody)
    tc = body.training_config
    job_id = rlorTrainerJobId
    if job_id and not fw.RESOURCE_ID_RE.match(job_id):
        raise BadRequest(f"rlorTrainerJobId {shown(job_id)}: use 1-63 characters of a-z 0-9 -")
    shape: fw.PublishedShape | None
    if trainingShape:
        shape = fw.shape_from_ref(trainingShape)
        fw.check_shape_mode(shape, tc.lora_rank, body.forward_only)
    else:
        shape = fw.auto_shape(tc.base_model, tc.lora_rank, body.forward_only)
    profile: dict[str, Any] = (
        fw.shape_profile(shape) if shape else {"shape_id": None, "training_shape": ""}
    )
    if tc.max_context_length is not None or shape is None:
        profile["max_sequence_length"] = tc.max_context_length or fw.DEFAULT_CONTEXT
    cfg = {"base_model": model_name(request, tc.base_model), "lora_rank": tc.lora_rank,
           "learning_rate": tc.learning_rate, "display_name": body.display_name,
           "forward_only": body.forward_only, "requested_base_model": tc.base_model}  # fmt: skip
    jobs = ctx(request).jobs
    try:
        row = await run_in_threadpool(jobs.create_trainer, cfg, tenant, job_id or None, profile)
    except JobExists as e:
        raise HTTPException(409, str(e)) from None
    return SafeJSON(fw.job_resource(row))


@router.get("/v1/accounts/{account}/rlorTrainerJobs")
async def list_trainer_jobs(
    account: str, request: Request, pageSize: int = PageSize, pageToken: str = PageToken
) -> SafeJSON:
    jobs = ctx(request).jobs.list("trainer", _scope(request, account))
    rows, token = fw.page([fw.job_resource(r) for r in jobs], pageSize, pageToken)
    return SafeJSON({"rlorTrainerJobs": rows, "nextPageToken": token, "totalSize": len(jobs)})


@router.get("/v1/accounts/{account}/rlorTrainerJobs/{job_id}")
async def get_trainer_job(account: str, job_id: str, request: Request) -> SafeJSON:
    return SafeJSON(fw.job_resource(_trainer(request, account, job_id)))


@router.delete("/v1/accounts/{account}/rlorTrainerJobs/{job_id}")
async def delete_trainer_job(account: str, job_id: str, request: Request) -> SafeJSON:
    """Unload the job's runs (memory freed now); its checkpoints stay listed and promotable."""
    row = _trainer(request, account, job_id)
    done = await run_in_threadpool(ctx(request).jobs.delete, row["id"])
    return SafeJSON(fw.job_resource(done))


@router.post("/v1/accounts/{account}/rlorTrainerJobs/{job_id}:cancel")
async def cancel_trainer_job(account: str, job_id: str, request: Request) -> SafeJSON:
    """Stop the endpoint (runs unloaded, checkpoints kept); ``:resume`` starts it again."""
    row = _trainer(request, account, job_id)
    done = await run_in_threadpool(ctx(request).jobs.cancel, row["id"])
    return SafeJSON(fw.job_resource(done))


@router.post("/v1/accounts/{account}/rlorTrainerJobs/{job_id}:resume")
async def resume_trainer_job(account: str, job_id: str, request: Request) -> SafeJSON:
    row = _trainer(request, account, job_id)
    if row["state"] == "deleted":
        raise BadRequest(f"rlorTrainerJob {row['id']} was deleted: create a new one")
    done = await run_in_threadpool(ctx(request).jobs.resume, row["id"])
    return SafeJSON(fw.job_resource(done))


@router.get("/v1/accounts/{account}/rlorTrainerJobs/{job_id}/checkpoints")
async def list_job_checkpoints(
    account: str,
    job_id: str,
    request: Request,
    pageSize: int = PageSize,
    pageToken: str = PageToken,
) -> SafeJSON:
    """Every checkpoint of every run of the job, oldest first, the job deleted or not."""
    row = _trainer(request, account, job_id)
    store = ctx(request).store
    rows = []
    for run_id in store.job_run_ids(row["id"]):
        run = store.run(run_id, include_deleted=True)
        lora = run is not None and run["lora_rank"] > 0
        rows += [fw.checkpoint_resource(row, ck, lora) for ck in store.checkpoints(run_id)]
    rows.sort(key=lambda r: r["createTime"])
    shown_rows, token = fw.page(rows, pageSize, pageToken)
    return SafeJSON({"checkpoints": shown_rows, "nextPageToken": token, "totalSize": len(rows)})


# ---- promotion and models ----------------------------------------------------------------
@router.post(
    "/v1/accounts/{account}/checkpoints/{checkpoint}:promote",
    openapi_extra=json_body(PromoteCheckpointBody),
)
async def promote_checkpoint(account: str, checkpoint: str, request: Request) -> SafeJSON:
    """A sampler checkpoint of the job becomes ``output_model``, answered at once with
    ``{"model": ...}`` (the model serves ``/v1/chat/completions`` right away)."""
    tenant = _scope(request, account)
    body = await body_of(request, PromoteCheckpointBody)
    out = HOSTED_MODEL_RE.fullmatch(body.output_model)
    if out is None or out.group(1) != account:
        raise BadRequest(
            f"output_model {shown(body.output_model)}: expected accounts/{account}/models/<id>"
        )
    job_id = body.trainer_job_id.rsplit("/", 1)[-1]
    if (
        "/" in body.trainer_job_id
        and body.trainer_job_id != f"accounts/{account}/rlorTrainerJobs/{job_id}"
    ):
        raise BadRequest(
            f"trainer_job_id {shown(body.trainer_job_id)}: expected "
            f"accounts/{account}/rlorTrainerJobs/<job>"
        )
    row = _trainer(request, account, job_id)
    c = ctx(request)
    model = await run_in_threadpool(c.jobs.promote, row["id"], checkpoint, out.group(2), tenant)
    return SafeJSON({"model": fw.model_resource(model)})


@router.get("/v1/accounts/{account}/models/{model}")
async def get_model(account: str, model: str, request: Request) -> SafeJSON:
    """A promoted model of the account, or (account ``fireworks``) a base model."""
    if account == HOSTED_BASE_ACCOUNT:
        name = f"accounts/{account}/models/{model}"
        found = fw.base_model_resource(name, model_name(request, name))
        if found is None:
            raise NotFound(f"unknown model {shown(name)}")
        return SafeJSON(found)
    row = ctx(request).store.model(model, _scope(request, account))
    if row is None:
        raise NotFound(f"unknown model {shown(f'accounts/{account}/models/{model}')}")
    return SafeJSON(fw.model_resource(row))
