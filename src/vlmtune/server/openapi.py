"""The OpenAPI schema: request bodies from the wire models, errors as they are answered.

Handlers read their bodies by hand (``body_of``: JSON or, for ``forward_backward``,
protobuf), so FastAPI cannot see them. Each POST route declares its body with
``openapi_extra=json_body(Model)``; ``openapi_schema`` then moves the models' shared
definitions into ``components/schemas`` and documents the error answers every route
can give (FastAPI's 422 never happens here: validation errors are 400s).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from vlmtune.protocol.wire import WireModel

DESCRIPTION = (
    "Send the API key as `Authorization: Bearer <key>` (or `X-API-Key`). A trainer job's "
    "endpoint is this same API under `/trainer/{job_id}` (e.g. "
    "`/trainer/job-0123456789ab/api/v1/create_model`): runs created there belong to the job."
)
# Where ``json_body`` parks a model's definitions until ``openapi_schema`` moves them.
_DEFS_KEY = "x-vlmtune-schemas"
_REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str = Field(description="the same text as detail")
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")


class ErrorBody(BaseModel):
    """Every error answer: ``detail`` for Tinker/FastAPI clients, ``error`` for OpenAI ones."""

    detail: str = Field(description="what was wrong, naming the field or id at fault")
    error: ErrorDetail | None = Field(None, description="absent on the gate's 401 and 413")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "malformed or invalid request"},
    401: {"model": ErrorBody, "description": "missing or invalid API key"},
    404: {"model": ErrorBody, "description": "unknown id"},
    413: {"model": ErrorBody, "description": "request body over the server's limit"},
}


def json_body(model: type[WireModel], required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as a route's JSON body."""
    schema = model.model_json_schema(ref_template=_REF)
    defs = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": required,
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}
            },
        },
        _DEFS_KEY: {**defs, model.__name__: schema},
    }


def openapi_schema(api: FastAPI) -> dict[str, Any]:
    """The app's schema, built once: FastAPI's, with the body definitions moved into
    components and the never-sent 422 dropped."""
    if api.openapi_schema is not None:
        return api.openapi_schema
    schema = get_openapi(
        title=api.title, version=api.version, description=DESCRIPTION, routes=api.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for name, definition in operation.pop(_DEFS_KEY, {}).items():
                if components.setdefault(name, definition) != definition:
                    raise ValueError(f"two different OpenAPI schemas named {name}")
            operation.get("responses", {}).pop("422", None)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    api.openapi_schema = schema
    return schema
