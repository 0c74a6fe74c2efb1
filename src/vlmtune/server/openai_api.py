"""OpenAI-compatible deployment sampling: ``GET /v1/models``, ``POST /v1/chat/completions``.

Serves promoted models and the base models on this machine, so any OpenAI client
(and ``vlmtune eval --server``) can evaluate a fine-tuned model. Messages go through
the data layer's row parser (images must be ``data:`` URLs: the server never reads
its own files or the network on a client's behalf) and the engine's renderer, so a
prompt is laid out exactly as in training.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import Field

from vlmtune.engine.engine import TrainingEngine
from vlmtune.server.context import SafeJSON, ServerContext, ctx
from vlmtune.server.inference import load_inference_engine
from vlmtune.server.service_api import available_base_models
from vlmtune.server.tinker_api import body_of
from vlmtune.server.wire import BadRequest, NotFound, _Wire
from vlmtune.types import SamplingParams

router = APIRouter()
ROLES = ("system", "user", "assistant")


class ChatBody(_Wire):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


def _check_messages(messages: list[dict[str, Any]]) -> None:
    """Shape checks the row parser does not make: roles, and data URLs only."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}]: role must be one of {list(ROLES)}")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content: must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
                raise BadRequest(f"messages[{i}].content[{j}]: parts are text or image_url")
            if part["type"] == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise BadRequest(
                        f"messages[{i}].content[{j}]: images must be data: URLs "
                        "(data:image/png;base64,...); this server fetches no URLs"
                    )


def parse_messages(messages: list[dict[str, Any]], empty_dir: Path) -> list[Any]:
    from vlmtune.data.errors import RowError
    from vlmtune.data.refs import RefContext
    from vlmtune.data.rows import RowParser

    _check_messages(messages)
    parser = RowParser("rl", RefContext(base_dir=empty_dir), max_images_per_message=None)
    try:
        return parser.parse({"messages": messages}, 1).row.messages
    except RowError as e:
        raise BadRequest(f"messages: {e}") from None


def _resolve(c: ServerContext, model: str) -> tuple[str, Any]:
    """(pool key, loader) for a promoted model id or a base model name."""
    row = c.store.one("SELECT * FROM models WHERE id = ?", (model,))
    if row is not None:
        return row["path"], lambda: load_inference_engine(row["path"], row["base_model"] or None)
    try:
        c.runs.engine_config(model, 0, None)
    except BadRequest:
        raise NotFound(f"model {model!r} does not exist (GET /v1/models lists them)") from None
    return f"base:{model}", lambda: load_inference_engine(model)


def _generate(engine: TrainingEngine, messages: list[Any], params: SamplingParams, n: int) -> dict:
    rendered = engine.renderer.render_prompt(messages)
    out = engine.sample([rendered.model_input], n, params)[0].sequences
    stop_ids = set(engine.renderer.stop_token_ids)
    choices = []
    for s in out:
        tokens = [t for t in s.tokens if t not in stop_ids]
        pieces, prev = [], ""
        for k in range(1, len(tokens) + 1):  # per-token text, for streaming
            text = engine.renderer.decode(tokens[:k])
            pieces.append(text[len(prev) :])
            prev = text
        choices.append(
            {"text": prev, "pieces": pieces, "finish": s.stop_reason, "n": len(s.tokens)}
        )
    return {
        "choices": choices,
        "prompt_tokens": rendered.length,
        "dropped": rendered.images_dropped,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> SafeJSON:
    c = ctx(request)
    data = [
        {"id": r["id"], "object": "model", "created": int(r["created"]), "owned_by": "vlmtune",
         "vlmtune": {"kind": "promoted", "base_model": r["base_model"], "source": r["source"]}}
        for r in c.store.all("SELECT * FROM models ORDER BY created")
    ]  # fmt: skip
    for name, _ in await run_in_threadpool(available_base_models):
        data.append({"id": name, "object": "model", "created": 0, "owned_by": "vlmtune",
                     "vlmtune": {"kind": "base", "base_model": name}})  # fmt: skip
    return SafeJSON({"object": "list", "data": data})


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> SafeJSON | StreamingResponse:
    c = ctx(request)
    body: ChatBody = await body_of(request, ChatBody)
    empty = c.config.data_dir / "empty"
    empty.mkdir(exist_ok=True)
    messages = await run_in_threadpool(parse_messages, body.messages, empty)
    key, loader = await run_in_threadpool(_resolve, c, body.model)
    params = SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens or 256,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop,
        seed=body.seed,
    )
    fut = c.pool.run(key, loader, lambda e: _generate(e, messages, params, body.n))
    try:
        result = await asyncio.wrap_future(fut)
    except ValueError as e:  # e.g. a conversation the renderer refuses
        raise BadRequest(str(e)) from None
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    completion = sum(ch["n"] for ch in result["choices"])
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": completion,
             "total_tokens": result["prompt_tokens"] + completion}  # fmt: skip
    if not body.stream:
        return SafeJSON(
            {
                "id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [
                    {"index": i, "message": {"role": "assistant", "content": ch["text"]},
                     "finish_reason": ch["finish"]}
                    for i, ch in enumerate(result["choices"])
                ],
                "usage": usage,
                "vlmtune": {"images_dropped": result["dropped"]},
            }
        )  # fmt: skip

    def events() -> Iterator[str]:
        # The whole completion is generated first (the engine has no token callback);
        # it is then sent in OpenAI's chunk format, one token's text per chunk.
        def chunk(i: int, delta: dict, finish: str | None = None) -> str:
            return "data: " + json.dumps({
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": i, "delta": delta, "finish_reason": finish}],
            }) + "\n\n"  # fmt: skip

        for i, ch in enumerate(result["choices"]):
            yield chunk(i, {"role": "assistant", "content": ""})
            for piece in ch["pieces"]:
                if piece:
                    yield chunk(i, {"content": piece})
            yield chunk(i, {}, ch["finish"])
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
