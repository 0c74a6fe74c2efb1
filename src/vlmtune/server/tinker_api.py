"""The training half of the Tinker HTTP protocol: runs, primitives, sampling, futures.

Every training call answers at once with ``{"request_id": ...}`` after the request is
fully validated (a bad one is a 400 and never reaches the engine); the client then
polls ``/api/v1/retrieve_future``, which holds the connection open until the result
is ready (or answers ``try_again``). Results are protobuf when the client asks for it
(``ForwardBackwardOutput`` and ``SampleResponse``, as the ``tinker`` client does),
JSON otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from vlmtune.server.context import SafeJSON, ServerContext, ctx
from vlmtune.server.inference import SampleResult
from vlmtune.server.proto import decode_forward_backward_request, encode_forward_backward_output
from vlmtune.server.runs import Run, model_pixels
from vlmtune.server.wire import (
    BadRequest,
    CreateModelBody,
    ForwardBackwardBody,
    LoadWeightsBody,
    NotFound,
    OptimStepBody,
    SampleBody,
    SaveSamplerBody,
    SaveWeightsBody,
    _Wire,
    parse_body,
)
from vlmtune.types import ForwardBackwardOutput

log = logging.getLogger("vlmtune.server")
router = APIRouter()
PROTO = "application/x-protobuf"


class ModelIdBody(_Wire):
    model_id: str


class RetrieveBody(_Wire):
    request_id: str
    allow_metadata_only: bool = False


async def body_of(request: Request, model: type[_Wire]) -> Any:
    return parse_body(await request.body(), model)


def tinker_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Names as ``name:reduction`` (the client splits on the one colon to combine chunks)."""
    out = {}
    for key, value in metrics.items():
        out[key if key.count(":") == 1 else key.replace(":", "_") + ":mean"] = float(value)
    return out


def _register(
    c: ServerContext, fut: concurrent.futures.Future, kind: str, run: Run | None, seq: int | None
) -> SafeJSON:
    rid = c.futures.add(fut, kind, run.id if run else None)
    if run is not None and seq is not None:
        run.seen[seq] = rid
        while len(run.seen) > 4096:
            run.seen.popitem(last=False)
    return SafeJSON({"request_id": rid, "model_id": run.id if run else None})


def _register_sample(c: ServerContext, fut: concurrent.futures.Future, n: int) -> SafeJSON:
    rid = c.futures.add(fut, "sample", None)
    return SafeJSON({"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(n)]})


def _duplicate(run: Run, seq: int | None) -> SafeJSON | None:
    # A client that lost the response to a POST sends it again with the same seq_id:
    # answer with the first request's future rather than running it twice.
    if seq is not None and seq in run.seen:
        return SafeJSON({"request_id": run.seen[seq], "model_id": run.id})
    return None


async def _validated(run: Run, seq: int | None, fn: Any, *args: Any) -> Any:
    """Run a validation step; on rejection, tell the run's worker not to wait for ``seq``."""
    try:
        return await run_in_threadpool(fn, *args)
    except (BadRequest, NotFound):
        run.worker.skip(seq)
        raise


# ---- model lifecycle -----------------------------------------------------------------
@router.post("/api/v1/create_model")
async def create_model(request: Request) -> SafeJSON:
    c = ctx(request)
    body: CreateModelBody = await body_of(request, CreateModelBody)
    if c.store.one("SELECT id FROM sessions WHERE id = ?", (body.session_id,)) is None:
        raise NotFound(f"unknown session {body.session_id!r} (POST /api/v1/create_session first)")
    rank = body.lora_config.rank if body.lora_config else 0
    overrides = dict(body.engine or {})
    if body.lora_config and body.lora_config.seed is not None:
        overrides.setdefault("seed", body.lora_config.seed)
    job_id = request.scope.get("vlmtune.trainer_job")
    if job_id is not None:
        c.jobs.check_trainer_run(job_id, body.base_model, rank)
    run_id = f"{body.session_id}:train:{body.model_seq_id}"
    run, fut = await run_in_threadpool(
        lambda: c.runs.create(
            run_id, body.base_model, rank, overrides, session_id=body.session_id,
            job_id=job_id, user_metadata=body.user_metadata,
        )
    )  # fmt: skip
    return _register(c, fut, "create_model", run, None)


@router.post("/api/v1/get_info")
async def get_info(request: Request) -> SafeJSON:
    c = ctx(request)
    body: ModelIdBody = await body_of(request, ModelIdBody)
    run = c.runs.get(body.model_id)
    path, lo, hi = await run_in_threadpool(model_pixels, run.config)
    row = c.store.one("SELECT step FROM runs WHERE id = ?", (run.id,))
    step = run.engine.step if run.engine is not None else (row["step"] if row else 0)
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
                "step": step,
                "mode": cfg.mode,
                "min_pixels": lo,
                "max_pixels": hi,
                "max_images_per_message": cfg.max_images_per_message,
                "job_id": run.job_id,
            },
        }
    )


# ---- primitives ----------------------------------------------------------------------
async def _forward_backward(
    c: ServerContext, body: ForwardBackwardBody, forward_only: bool
) -> SafeJSON:
    run = c.runs.get(body.model_id)
    dup = _duplicate(run, body.seq_id)
    if dup is not None:
        return dup
    validator = await _validated(run, body.seq_id, c.runs.validator, run.config)
    datums, config = await _validated(
        run, body.seq_id, validator.forward_backward, body.forward_backward_input
    )
    fut = c.runs.forward_backward(
        run, datums, body.forward_backward_input.loss_fn, config, forward_only, body.seq_id
    )
    return _register(c, fut, "forward_backward", run, body.seq_id)


@router.post("/api/v1/forward_backward")
async def forward_backward(request: Request) -> SafeJSON:
    raw = await request.body()
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise BadRequest("compressed request bodies are not supported (send it uncompressed)")
    if PROTO in request.headers.get("content-type", ""):
        decoded = await run_in_threadpool(decode_forward_backward_request, raw)
        body = parse_body(decoded, ForwardBackwardBody)
    else:
        body = await run_in_threadpool(parse_body, raw, ForwardBackwardBody)
    return await _forward_backward(ctx(request), body, body.forward_only)


@router.post("/api/v1/forward")
async def forward(request: Request) -> SafeJSON:
    body = await run_in_threadpool(parse_body, await request.body(), ForwardBackwardBody)
    return await _forward_backward(ctx(request), body, True)


@router.post("/api/v1/optim_step")
async def optim_step(request: Request) -> SafeJSON:
    c = ctx(request)
    body: OptimStepBody = await body_of(request, OptimStepBody)
    run = c.runs.get(body.model_id)
    dup = _duplicate(run, body.seq_id)
    if dup is not None:
        return dup
    params = await _validated(run, body.seq_id, body.params)
    return _register(c, c.runs.optim_step(run, params, body.seq_id), "optim_step", run, body.seq_id)


@router.post("/api/v1/save_weights")
async def save_weights(request: Request) -> SafeJSON:
    c = ctx(request)
    body: SaveWeightsBody = await body_of(request, SaveWeightsBody)
    run = c.runs.get(body.model_id)
    dup = _duplicate(run, body.seq_id)
    if dup is not None:
        return dup
    name = body.path or f"state-{uuid.uuid4().hex[:12]}"
    fut = await _validated(
        run,
        body.seq_id,
        c.runs.save_state,
        run,
        name,
        body.overwrite,
        body.extra,
        body.user_metadata,
        body.seq_id,
    )
    return _register(c, fut, "save_weights", run, body.seq_id)


@router.post("/api/v1/load_weights")
async def load_weights(request: Request) -> SafeJSON:
    c = ctx(request)
    body: LoadWeightsBody = await body_of(request, LoadWeightsBody)
    if body.model_id is None:  # create a run from a checkpoint (create_training_client_from_state)
        if body.session_id is None or body.model_seq_id is None:
            raise BadRequest("load_weights needs model_id, or session_id and model_seq_id")
        row = await run_in_threadpool(c.runs.resolve_checkpoint, body.path, None, "training")
        src = c.runs.get(row["run_id"])
        if body.base_model and body.base_model != src.config.base_model:
            raise BadRequest(f"checkpoint is for {src.config.base_model}, not {body.base_model}")
        run_id = f"{body.session_id}:train:{body.model_seq_id}"
        overrides = {
            k: getattr(src.config, k)
            for k in ("lora_alpha", "target_modules", "min_pixels", "max_pixels")
        }
        run, _ = await run_in_threadpool(
            lambda: c.runs.create(run_id, src.config.base_model, src.config.lora_rank if src.is_lora else 0,
                                  overrides, session_id=body.session_id, job_id=src.job_id)
        )  # fmt: skip
        fut = await _validated(run, None, c.runs.load_state, run, body.path, body.optimizer, None)
        return _register(c, fut, "load_weights", run, None)
    run = c.runs.get(body.model_id)
    dup = _duplicate(run, body.seq_id)
    if dup is not None:
        return dup
    fut = await _validated(
        run, body.seq_id, c.runs.load_state, run, body.path, body.optimizer, body.seq_id
    )
    return _register(c, fut, "load_weights", run, body.seq_id)


@router.post("/api/v1/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request) -> SafeJSON:
    c = ctx(request)
    body: SaveSamplerBody = await body_of(request, SaveSamplerBody)
    run = c.runs.get(body.model_id)
    dup = _duplicate(run, body.seq_id)
    if dup is not None:
        return dup
    if body.path is None:  # a sampling session over the run's weights, nothing on disk
        fut = c.samplers.from_run(run, body.kind, body.seq_id)
    else:
        args = (run, body.path, body.checkpoint_type, body.seq_id)
        fut = await _validated(run, body.seq_id, c.runs.save_for_sampler, *args)
    return _register(c, fut, "save_weights_for_sampler", run, body.seq_id)


# ---- sampling ------------------------------------------------------------------------
@router.post("/api/v1/asample")
async def asample(request: Request) -> SafeJSON:
    c = ctx(request)
    body: SampleBody = await run_in_threadpool(parse_body, await request.body(), SampleBody)
    body.check_supported()
    if body.sampling_session_id:
        sampler = c.samplers.get(body.sampling_session_id)
    else:
        sampler = await run_in_threadpool(c.samplers.create, body.model_path, body.base_model)
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
    return _register_sample(c, fut, body.num_samples)


# ---- futures -------------------------------------------------------------------------
def _error_category(exc: BaseException) -> str:
    return "user" if isinstance(exc, BadRequest | NotFound | ValueError) else "server"


@router.post("/api/v1/retrieve_future")
async def retrieve_future(request: Request) -> Response:
    c = ctx(request)
    body: RetrieveBody = await body_of(request, RetrieveBody)
    pending = c.futures.get(body.request_id)
    if pending is None:
        raise NotFound(f"unknown request id {body.request_id!r} (results are kept for an hour)")
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
        return SafeJSON({"error": f"{type(exc).__name__}: {exc}" if _error_category(exc) == "server" else str(exc),
                         "category": _error_category(exc)})  # fmt: skip
    result = pending.future.result()
    wants_proto = PROTO in request.headers.get("accept", "")
    if pending.kind == "create_model":
        return SafeJSON({"type": "create_model", "model_id": pending.model_id})
    if isinstance(result, ForwardBackwardOutput):
        if wants_proto:
            outputs = [{k: t.data for k, t in o.items()} for o in result.loss_fn_outputs]
            return Response(
                encode_forward_backward_output(outputs, tinker_metrics(result.metrics)),
                media_type=PROTO,
            )
        return SafeJSON({"loss_fn_output_type": "TensorData", "metrics": tinker_metrics(result.metrics),
                         "loss_fn_outputs": [{k: t.model_dump() for k, t in o.items()} for o in result.loss_fn_outputs]})  # fmt: skip
    if isinstance(result, SampleResult):
        if wants_proto:
            return Response(await run_in_threadpool(result.to_proto), media_type=PROTO)
        return SafeJSON(result.to_json())
    return SafeJSON(result if isinstance(result, dict) else {"result": result})


@router.post("/api/v1/cancel_future")
async def cancel_future(request: Request) -> SafeJSON:
    body: RetrieveBody = await body_of(request, RetrieveBody)
    pending = ctx(request).futures.get(body.request_id)
    if pending is not None:
        pending.future.cancel()  # only work that has not started yet can be cancelled
    return SafeJSON({})
