"""What every route handler needs: the server's settings, its long-lived parts, the
request body as a wire model, and a JSON response that survives a diverged loss."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from vlmtune.protocol.wire import WireModel, parse_body
from vlmtune.server.auth import IDENTITY_SCOPE_KEY, Identity

if TYPE_CHECKING:
    from vlmtune.server.inference import ModelPool
    from vlmtune.server.jobs import JobRunner
    from vlmtune.server.runs import RunManager
    from vlmtune.server.samplers import SamplerManager
    from vlmtune.server.store import Store
    from vlmtune.server.workers import FutureRegistry


@dataclass
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: Path | None = None
    max_body_mb: float = 64.0
    max_loaded_models: int = 2  # inference engines kept in memory (LRU)
    max_concurrent_jobs: int = 1  # TOML job worker processes at once
    # Folders TOML jobs may read besides their uploads (--allow-data-root); see job_access.
    allowed_data_roots: tuple[Path, ...] = ()
    poll_timeout_s: float = 20.0  # how long retrieve_future holds a request open
    gap_timeout_s: float = 10.0  # how long a run waits for a missing seq_id
    # --model-alias: a client's model name (lower-cased) -> the model served for it.
    model_aliases: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServerContext:
    config: ServerConfig
    store: Store
    runs: RunManager
    futures: FutureRegistry
    pool: ModelPool
    jobs: JobRunner
    samplers: SamplerManager


M = TypeVar("M", bound=WireModel)


def ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


def caller(request: Request) -> Identity:
    """Who sent the request: the identity of the key the gate verified."""
    identity = request.scope.get(IDENTITY_SCOPE_KEY)
    if identity is None:  # a route reached around the gate: refuse rather than guess
        raise RuntimeError("request carries no verified API key")
    return identity


def tenant_of(request: Request) -> str | None:
    """The tenant whose objects the request may reach; None: every tenant's (an operator).
    Lookups take it and answer as for an unknown id when another tenant owns the object."""
    return caller(request).sees


def model_name(request: Request, name: str) -> str:
    """The model a client's name means on this server (``--model-alias``), applied once
    where a name comes in, so everything stored names the model actually served."""
    from vlmtune.models.registry import aliased

    return aliased(name, ctx(request).config.model_aliases)


async def body_of(request: Request, model: type[M]) -> M:
    """The request body as ``model`` (parsed off the event loop: bodies carry images)."""
    return await run_in_threadpool(parse_body, await request.body(), model)


class SafeJSON(JSONResponse):
    """JSON that cannot fail on a diverged loss: NaN/Infinity are written as Python's
    ``json`` writes them (and as the Python clients, ``tinker`` included, read them)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=True, separators=(",", ":")).encode()
