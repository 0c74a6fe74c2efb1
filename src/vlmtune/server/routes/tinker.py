"""The training half of the Tinker HTTP protocol: runs, primitives, sampling, futures.

Every training call answers at once with ``{"request_id": ...}`` after the request is
fully validated (a bad one is a 400 and never reaches the engine); the client then
polls ``/api/v1/retrieve_future``, which holds the connection open until the result
is ready (or answers ``try_again``). Results are protobuf when the client asks for it
(``ForwardBackwardOutput`` and ``SampleResponse``, as the ``tinker`` client does),
JSON otherwise. Handlers only parse and answer: ``RunManager.submit`` orders and
deduplicates the work, the run and sampler modules do it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from vlmtune.defaults import image_cap
from vlmtune.protocol.bodies import (
    CreateModelBody,
    ForwardBackwardBody,
    LoadWeightsBody,
    ModelIdBody,
    OptimStepBody,
    RetrieveBody,
    SampleBody,
    SaveSamplerBody,
    SaveWeightsBody,
)
from vlmtune.protocol.errors import BadRequest, NotFound, clipped, shown
from vlmtune.protocol.proto import (
    decode_forward_backward_request,
    encode_forward_backward_output,
    encode_sample_response,
)
from vlmtune.protocol.wire import forward_backward_json, parse_body, sample_json, tinker_metrics
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
from vlmtune.server.run_checkpoints import checkpoint_names
from vlmtune.server.run_config import model_pixels
from vlmtune.server.runs import Run, Task, run_id_for
from vlmtune.types import ForwardBackwardOutput, SampleResponse, lora_rank_of

log = logging.getLogger("vlmtune.server")
router = APIRouter()
PROTO = "application/x-protobuf"
MAX_ID_CHARS = 512  # a model id: a session id and a sequence number


async def _queued(
    c: ServerContext, run: Run, seq: int | None, kind: str, prepare: Callable[[], Task]
) -> SafeJSON:
    """``RunManager.submit`` off the event loop (checks read images); answer with the id."""
    request_id = await run_in_threadpool(c.runs.submit, run, seq, kind, prepare)
    return SafeJSON({"request_id": request_id, "model_id": run.id})


# ---- model lifecycle -----------------------------------------------------------------
@router.post("/api/v1/create_model", openapi_extra=json_body(CreateModelBody))
async def create_model(request: Request) -> SafeJSON:
    c = ctx(request)
    body = await body_of(request, CreateModelBody)
    session = c.store.session(body.session_id, tenant_of(request))
    if session is None:
        raise NotFound(
            f"unknown session {shown(body.session_id)} (POST /api/v1/create_session first)"
        )
    lora = body.lora_config
    if body.base_only and lora is not None and lora.rank > 0:
        raise BadRequest(
            "create_model: base_only=true is the frozen base model; send no lora_config"
        )
    rank = lora.rank if lora and not body.base_only else 0
    overrides = dict(body.engine or {})
    for key, value in (("seed", lora and lora.seed), ("lora_alpha", lora and lora.alpha)):
        if value is not None:
            overrides.setdefault(key, value)
    base = model_name(request, body.base_model)  # --model-alias
    job_id = request.scope.get("vlmtune.trainer_job")
    base_only = body.base_only
    if job_id is not None:
        job = c.jobs.get(job_id, tenant_of(request))
        # Every model of a forward-only job is a reference; a base_only one may sit in a
        # LoRA job (the DPO reference of a LoRA policy), whatever the job's rank.
        base_only = base_only or bool(job["config"].get("forward_only"))
        checked_rank = job["config"].get("lora_rank", rank) if base_only else rank
        c.jobs.check_trainer_run(job_id, base, checked_rank, tenant_of(request))
    run_id = run_id_for(body.session_id, body.model_seq_id, base_only)
    run = await run_in_threadpool(
        lambda: c.runs.create(
            run_id, base, rank, overrides, session_id=body.session_id,
            job_id=job_id, user_metadata=body.user_metadata, tenant=session["tenant"],
        )
    )  # fmt: skip
    return await _queued(c, run, None, "create_model", lambda: c.runs.build(run))


@router.post("/api/v1/get_info", openapi_extra=json_body(ModelIdBody))
async def get_info(request: Request) -> SafeJSON:
    c = ctx(request)
    body = await body_of(request, ModelIdBody)
    run = c.runs.get(body.model_id, tenant_of(request))
    path, lo, hi = await run_in_threadpool(model_pixels, run.config)
    engine = run.engine
    cfg = run.config
    return SafeJSON(
        {
            "type": "get_info",
            "model_id": run.id,
            "model_data": {
                "arch": "qwen3_vl",
                "model_name": cfg.base_model,
                "tokenizer_id": str(path),
            },
            "is_lora": run.is_lora,
            "lora_rank": cfg.lora_rank if run.is_lora else None,
            "model_name": cfg.base_model,
            "vlmtune": {
                "step": c.runs.step(run),
                "mode": cfg.mode,
                "min_pixels": lo,
                "max_pixels": hi,
                # Resolved (null: no cap): the client renders locally with it.
                "max_images_per_message": image_cap(cfg.base_model, cfg.max_images_per_message),
                "job_id": run.job_id,
                # Known once the engine is built (null before, e.g. after a restart).
                "dtype": None if engine is None else str(engine.dtype).removeprefix("torch."),
                "describe": None if engine is None else engine.describe(),
            },
        }
    )


# ---- primitives ----------------------------------------------------------------------
async def _forward_backward(
    request: Request, body: ForwardBackwardBody, forward_only: bool, reference: bool = False
) -> SafeJSON:
    c = ctx(request)
    run = c.runs.get(body.model_id, tenant_of(request))
    fb = body.forward_backward_input

    def prepare() -> Task:
        datums, config = c.runs.validator(run.config).forward_backward(fb)
        if reference:
            return c.runs.forward_reference(run, datums, fb.loss_fn, config)
        return c.runs.forward_backward(run, datums, fb.loss_fn, config, forward_only)

    return await _queued(c, run, body.seq_id, "forward_backward", prepare)


@router.post(
    "/api/v1/forward_backward",
    openapi_extra=json_body(ForwardBackwardBody),
    description="JSON, or the tinker client's protobuf ForwardBackwardRequest "
    "(Content-Type: application/x-protobuf).",
)
async def forward_backward(request: Request) -> SafeJSON:
    raw = await request.body()
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise BadRequest("compressed request bodies are not supported (send it uncompressed)")
    if PROTO in request.headers.get("content-type", ""):
        decoded = await run_in_threadpool(decode_forward_backward_request, raw)
        body = parse_body(decoded, ForwardBackwardBody)
    else:
        body = await run_in_threadpool(parse_body, raw, ForwardBackwardBody)
    return await _forward_backward(request, body, body.forward_only)


@router.post("/api/v1/forward", openapi_extra=json_body(ForwardBackwardBody))
async def forward(request: Request) -> SafeJSON:
    body = await body_of(request, ForwardBackwardBody)
    return await _forward_backward(request, body, True)


@router.post("/api/v1/forward_reference", openapi_extra=json_body(ForwardBackwardBody))
async def forward_reference(request: Request) -> SafeJSON:
    """vlmtune's extension: ``forward`` under the base model (LoRA disabled, or a frozen
    copy for full fine-tuning), queued in order with the run's other calls."""
    body = await body_of(request, ForwardBackwardBody)
    return await _forward_backward(request, body, True, reference=True)


@router.post("/api/v1/optim_step", openapi_extra=json_body(OptimStepBody))
async def optim_step(request: Request) -> SafeJSON:
    c = ctx(request)
    body = await body_of(request, OptimStepBody)
    run = c.runs.get(body.model_id, tenant_of(request))
    return await _queued(
        c, run, body.seq_id, "optim_step",
        lambda: c.runs.optim_step(run, body.params(), body.grad_accumulation_normalization),
    )  # fmt: skip


@router.post("/api/v1/save_weights", openapi_extra=json_body(SaveWeightsBody))
async def save_weights(request: Request) -> SafeJSON:
    c = ctx(request)
    body = await body_of(request, SaveWeightsBody)
    run = c.runs.get(body.model_id, tenant_of(request))
    name = body.path or f"state-{uuid.uuid4().hex[:12]}"
    return await _queued(
        c, run, body.seq_id, "save_weights",
        lambda: c.runs.save_state(run, name, body.overwrite, body.extra, body.user_metadata),
    )  # fmt: skip


@router.post("/api/v1/load_weights", openapi_extra=json_body(LoadWeightsBody))
async def load_weights(request: Request) -> SafeJSON:
    c = ctx(request)
    body = await body_of(request, LoadWeightsBody)
    sees = tenant_of(request)
    if body.model_id is None:  # create a run from a checkpoint (create_training_client_from_state)
        job_id = request.scope.get("vlmtune.trainer_job")
        run = await run_in_threadpool(_run_from_state, c, body, sees, job_id)
        seq = None
    else:
        run, seq = c.runs.get(body.model_id, sees), body.seq_id
    return await _queued(
        c, run, seq, "load_weights",
        lambda: c.runs.load_state(run, body.path, body.optimizer, sees),
    )  # fmt: skip


def _run_from_state(
    c: ServerContext, body: LoadWeightsBody, sees: str | None, job_id: str | None
) -> Run:
    """A new run, in the session's tenant, configured as the one that saved ``body.path``
    (both visible to ``sees``, None: any tenant; a bare name is looked up in ``job_id``)."""
    if body.session_id is None or body.model_seq_id is None:
        raise BadRequest("load_weights needs model_id, or session_id and model_seq_id")
    session = c.store.session(body.session_id, sees)
    if session is None:
        raise NotFound(
            f"unknown session {shown(body.session_id)} (POST /api/v1/create_session first)"
        )
    row = c.runs.resolve_checkpoint(body.path, None, "training", sees, job_id)
    src = c.runs.get(row["run_id"])
    if body.base_model and body.base_model != src.config.base_model:
        raise BadRequest(f"checkpoint is for {src.config.base_model}, not {shown(body.base_model)}")
    overrides = {
        k: getattr(src.config, k)
        for k in ("lora_alpha", "target_modules", "min_pixels", "max_pixels")
    }
    rank = lora_rank_of(src.config.mode, src.config.lora_rank)
    # Under a forward-only job, a run from a checkpoint is a frozen reference too.
    frozen = job_id is not None and bool(c.jobs.get(job_id, sees)["config"].get("forward_only"))
    run_id = run_id_for(body.session_id, body.model_seq_id, frozen)
    return c.runs.create(run_id, src.config.base_model, rank, overrides,
                         session_id=body.session_id, job_id=src.job_id,
                         tenant=session["tenant"])  # fmt: skip


@router.post("/api/v1/save_weights_for_sampler", openapi_extra=json_body(SaveSamplerBody))
async def save_weights_for_sampler(request: Request) -> SafeJSON:
    c = ctx(request)
    body = await body_of(request, SaveSamplerBody)
    run = c.runs.get(body.model_id, tenant_of(request))

    def prepare() -> Task:
        if body.path is None:  # a sampling session over the run's weights, nothing on disk
            return c.samplers.from_run(run, body.kind)
        meta = body.metadata or body.user_metadata
        return c.runs.save_for_sampler(run, body.path, body.saving_mode(), meta)

    return await _queued(c, run, body.seq_id, "save_weights_for_sampler", prepare)


@router.get("/api/v1/list_checkpoints")
async def list_checkpoints(
    request: Request,
    model_id: Annotated[str | None, Query(max_length=MAX_ID_CHARS)] = None,
) -> SafeJSON:
    """The names of the resumable states (``save_weights``) of a trainer job's runs, oldest
    first (the Fireworks clients' resume probe): under ``/trainer/<job>``, the job's; with
    ``model_id``, that run's job's (or the run's own, outside a job)."""
    c = ctx(request)
    job_id = request.scope.get("vlmtune.trainer_job")
    if job_id is None and model_id is not None:
        run = c.runs.get(model_id, tenant_of(request))
        job_id = run.job_id
        if job_id is None:
            return SafeJSON({"checkpoints": checkpoint_names(c.store, [run.id])})
    if job_id is None:
        raise BadRequest(
            "list_checkpoints lists a trainer job's checkpoints: call it under "
            "/trainer/<job_id>/api/v1/ (or pass ?model_id=<a run's model id>)"
        )
    names = await run_in_threadpool(checkpoint_names, c.store, c.store.job_run_ids(job_id))
    return SafeJSON({"checkpoints": names})


# ---- sampling ------------------------------------------------------------------------
@router.post("/api/v1/asample", openapi_extra=json_body(SampleBody))
async def asample(request: Request) -> SafeJSON:
    c = ctx(request)
    body = await body_of(request, SampleBody)
    body.check_supported()
    who = caller(request)
    if body.sampling_session_id:
        sampler = c.samplers.get(body.sampling_session_id, who.sees)
    else:
        sampler = await run_in_threadpool(
            c.samplers.create,
            body.model_path,
            body.base_model and model_name(request, body.base_model),
            who.tenant,
            who.sees,
        )
    validator = await run_in_threadpool(c.samplers.validator, sampler)
    prompt = await run_in_threadpool(validator.model_input, body.prompt, "prompt")
    params = body.sampling_params.to_params()
    fut = c.samplers.sample(
        sampler,
        prompt,
        body.num_samples,
        params,
        bool(body.prompt_logprobs),
        body.prompt_logprobs_last_n,
    )
    rid = c.futures.add(fut, "sample", None, sampler.tenant)
    n = body.num_samples
    return SafeJSON({"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(n)]})


# ---- futures -------------------------------------------------------------------------
def _error_category(exc: BaseException) -> str:
    return "user" if isinstance(exc, BadRequest | NotFound | ValueError) else "server"


@router.post("/api/v1/retrieve_future", openapi_extra=json_body(RetrieveBody))
async def retrieve_future(request: Request) -> Response:
    c = ctx(request)
    body = await body_of(request, RetrieveBody)
    pending = c.futures.get(body.request_id, tenant_of(request))
    if pending is None:
        raise NotFound(
            f"unknown request id {shown(body.request_id)} (results are kept for an hour)"
        )
    if not pending.future.done():
        wrapped = asyncio.wrap_future(pending.future)
        # Whoever reads the result reads it from the concurrent future; this only keeps
        # asyncio from logging the wrapper's exception as "never retrieved".
        wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.wait({wrapped}, timeout=c.config.poll_timeout_s)
    if not pending.future.done():
        return SafeJSON(
            {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
        )
    c.futures.mark_retrieved(body.request_id)
    exc = pending.future.exception()
    if exc is not None:
        if _error_category(exc) == "server":
            log.error("request %s failed", body.request_id, exc_info=exc)
        message = f"{type(exc).__name__}: {exc}" if _error_category(exc) == "server" else str(exc)
        return SafeJSON({"error": clipped(message),
                         "category": _error_category(exc)})  # fmt: skip
    if pending.kind == "create_model":
        return SafeJSON({"type": "create_model", "model_id": pending.model_id})
    result = pending.future.result()
    if PROTO in request.headers.get("accept", "") and isinstance(
        result, ForwardBackwardOutput | SampleResponse
    ):
        return Response(await run_in_threadpool(_proto, result), media_type=PROTO)
    if isinstance(result, ForwardBackwardOutput):
        return SafeJSON(forward_backward_json(result))
    if isinstance(result, SampleResponse):
        return SafeJSON(sample_json(result))
    return SafeJSON(result if isinstance(result, dict) else {"result": result})


def _proto(result: ForwardBackwardOutput | SampleResponse) -> bytes:
    if isinstance(result, SampleResponse):
        sequences = [(s.tokens, s.logprobs, s.stop_reason) for s in result.sequences]
        return encode_sample_response(sequences, result.prompt_logprobs)
    outputs = [{k: t.data for k, t in o.items()} for o in result.loss_fn_outputs]
    return encode_forward_backward_output(outputs, tinker_metrics(result.metrics))


@router.post("/api/v1/cancel_future", openapi_extra=json_body(RetrieveBody))
async def cancel_future(request: Request) -> SafeJSON:
    body = await body_of(request, RetrieveBody)
    # Another tenant's request is answered as an unknown one: nothing to cancel.
    pending = ctx(request).futures.get(body.request_id, tenant_of(request))
    if pending is not None:
        pending.future.cancel()  # only work that has not started yet can be cancelled
    return SafeJSON({})
