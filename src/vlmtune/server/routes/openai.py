"""OpenAI-compatible deployment sampling: ``GET /v1/models``, ``POST /v1/chat/completions``.

Serves promoted models and the base models on this machine, so any OpenAI client
(and ``vlmtune eval --server``) can evaluate a fine-tuned model. ``chat.py`` turns the
messages into a prompt exactly as in training and generates; ``catalog.py`` says which
model a name is.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import Field

from vlmtune.protocol.errors import BadRequest
from vlmtune.protocol.wire import WireModel
from vlmtune.server import catalog
from vlmtune.server.chat import (
    assistant_message,
    generate,
    parse_messages,
    plan_tools,
    stream_deltas,
)
from vlmtune.server.context import SafeJSON, body_of, ctx, model_name, tenant_of
from vlmtune.server.openapi import json_body
from vlmtune.types import SamplingParams

router = APIRouter()


class ChatBody(WireModel):
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
    tools: list[dict[str, Any]] | None = Field(
        None, description='OpenAI function specs: [{"type": "function", "function": {...}}]'
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None,
        description='"none", "auto" (the default with tools), "required", or '
        '{"type": "function", "function": {"name": ...}}',
    )


@router.get("/v1/models")
async def list_models(request: Request) -> SafeJSON:
    c = ctx(request)
    data = [
        {"id": r["id"], "object": "model", "created": int(r["created"]), "owned_by": "vlmtune",
         "vlmtune": {"kind": "promoted", "base_model": r["base_model"], "source": r["source"]}}
        for r in c.store.models(tenant_of(request))
    ]  # fmt: skip
    for name, _ in await run_in_threadpool(catalog.available_base_models):
        data.append({"id": name, "object": "model", "created": 0, "owned_by": "vlmtune",
                     "vlmtune": {"kind": "base", "base_model": name}})  # fmt: skip
    return SafeJSON({"object": "list", "data": data})


@router.post("/v1/chat/completions", response_model=None, openapi_extra=json_body(ChatBody))
async def chat_completions(request: Request) -> SafeJSON | StreamingResponse:
    c = ctx(request)
    body = await body_of(request, ChatBody)
    empty = c.config.data_dir / "empty"
    empty.mkdir(exist_ok=True)
    messages = await run_in_threadpool(parse_messages, body.messages, empty)
    plan = plan_tools(body.tools, body.tool_choice)
    model = model_name(request, body.model)  # --model-alias
    key, loader = await run_in_threadpool(catalog.resolve, c.store, model, tenant_of(request))
    params = SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens or 256,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop,
        seed=body.seed,
    )
    fut = c.pool.run(key, loader, lambda e: generate(e, messages, params, body.n, plan))
    try:
        result = await asyncio.wrap_future(fut)
    except ValueError as e:  # e.g. a conversation the renderer refuses
        raise BadRequest(str(e)) from None
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    completion = sum(ch["n"] for ch in result["choices"])
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": completion,
             "total_tokens": result["prompt_tokens"] + completion}  # fmt: skip
    answers = [assistant_message(ch["text"], ch["finish"], plan) for ch in result["choices"]]
    extra: dict[str, Any] = {"images_dropped": result["dropped"]}
    if plan.parse:  # per choice: <tool_call> blocks left in the content, and why
        extra["tool_call_problems"] = [problems for _, _, problems in answers]
    if not body.stream:
        return SafeJSON(
            {
                "id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [
                    {"index": i, "message": message, "finish_reason": finish}
                    for i, (message, finish, _) in enumerate(answers)
                ],
                "usage": usage,
                "vlmtune": extra,
            }
        )  # fmt: skip

    def events() -> Iterator[str]:
        # The whole completion is generated first (the engine has no token callback);
        # it is then sent in OpenAI's chunk format, one token's text per chunk, or its
        # parsed tool calls as OpenAI streams them (``chat.stream_deltas``).
        def chunk(i: int, delta: dict, finish: str | None = None) -> str:
            return "data: " + json.dumps({
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": i, "delta": delta, "finish_reason": finish}],
            }) + "\n\n"  # fmt: skip

        for i, (ch, (message, finish, _)) in enumerate(
            zip(result["choices"], answers, strict=True)
        ):
            calls = "tool_calls" in message
            yield chunk(i, {"role": "assistant", "content": None if calls else ""})
            for delta in stream_deltas(message, ch["pieces"], plan.prefill):
                yield chunk(i, delta)
            yield chunk(i, {}, finish)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
