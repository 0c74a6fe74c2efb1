"""Uploaded files (``/v1/files``, shaped like OpenAI's files API): upload, list, show,
delete. A TOML job reads one as ``data = "file-<id>"`` (``server/files.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from vlmtune.protocol.files import DEFAULT_PURPOSE
from vlmtune.server.context import SafeJSON, caller, ctx, tenant_of
from vlmtune.server.files import file_json

router = APIRouter()

MULTIPART_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "default": DEFAULT_PURPOSE},
                    },
                }
            }
        },
    }
}


@router.post("/v1/files", openapi_extra=MULTIPART_BODY)
async def upload_file(request: Request) -> SafeJSON:
    """Stream a ``multipart/form-data`` upload (``file``, optional ``purpose``) to disk;
    the body size limit is the server's (--max-body-mb)."""
    return SafeJSON(file_json(await stream_upload(request)))


async def stream_upload(request: Request) -> dict[str, Any]:
    """A multipart upload streamed to the file store as the caller's: its row."""
    files = ctx(request).jobs.files
    file_id, upload = files.begin(request.headers.get("content-type", ""))
    try:
        async for chunk in request.stream():
            if chunk:
                await run_in_threadpool(upload.write, chunk)
        return await run_in_threadpool(files.add, file_id, upload, caller(request).tenant)
    finally:
        await run_in_threadpool(upload.discard)


@router.get("/v1/files")
async def list_files(
    request: Request,
    purpose: str | None = Query(None, max_length=64, description="only files of this purpose"),
) -> SafeJSON:
    rows = ctx(request).jobs.files.list(purpose, tenant_of(request))
    return SafeJSON({"object": "list", "data": [file_json(r) for r in rows]})


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request) -> SafeJSON:
    return SafeJSON(file_json(ctx(request).jobs.files.get(file_id, tenant_of(request))))


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> SafeJSON:
    """Delete an upload (refused while a queued or running job reads it)."""
    await run_in_threadpool(ctx(request).jobs.files.delete, file_id, tenant_of(request))
    return SafeJSON({"id": file_id, "object": "file", "deleted": True})
