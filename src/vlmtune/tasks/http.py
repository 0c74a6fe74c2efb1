"""A task over HTTP: the four routes (``task_router``), a standalone app (``task_app``,
what ``vlmtune tasks serve`` runs), and the client (``HttpTaskClient``).

The routes read their bodies as the server's routes do (``parse_body``: a bad body is a
400 naming the field) and raise the server's own ``BadRequest`` / ``NotFound``, so
mounted under ``vlmtune serve`` they answer through its error mapping and behind its
keys; the standalone app maps them the same way (400 and 404 with a ``detail``).
This module must not import ``vlmtune.server`` (that loads torch): the server passes
its schema helper in when it mounts the tasks.
"""

from __future__ import annotations

import hmac
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from vlmtune.protocol.errors import BadRequest, NotFound, clipped
from vlmtune.protocol.wire import WireModel, parse_body
from vlmtune.tasks.episodes import Episodes
from vlmtune.tasks.protocol import (
    EpisodeRequest,
    EpisodeStart,
    StepRequest,
    StepResult,
    Task,
    TaskError,
    TaskInfo,
)
from vlmtune.tasks.registry import installed, task_class, task_names

DEFAULT_TIMEOUT_S = 60.0


BodyDoc = Callable[[type[WireModel]], dict[str, Any]]  # a body model -> openapi_extra
OwnerOf = Callable[[Request], str | None]  # a request -> its tenant (None: sees every episode)


def task_router(
    task: str | type[Task],
    episodes: Episodes | None = None,
    body_doc: BodyDoc | None = None,
    owner_of: OwnerOf | None = None,
) -> APIRouter:
    """The four protocol routes for one task (an ``Episodes`` table of its own unless
    given); ``body_doc`` documents the bodies in the schema (the server's ``json_body``);
    ``owner_of`` names a request's tenant, whose episodes are its own (the server's
    ``tenant_of``; None: one tenant, as standalone)."""
    table = episodes or Episodes(task_class(task) if isinstance(task, str) else task)
    router = APIRouter(tags=[f"task {table.info.name}"])

    def doc(model: type[WireModel]) -> dict[str, Any] | None:
        return body_doc(model) if body_doc is not None else None

    def owner(request: Request) -> str | None:
        return owner_of(request) if owner_of is not None else None

    @router.get("/info", response_model=TaskInfo)
    async def info() -> TaskInfo:
        return table.info

    # The work runs in the thread pool: episodes step in parallel, the loop stays free.
    @router.post("/episodes", response_model=EpisodeStart, openapi_extra=doc(EpisodeRequest))
    async def start(request: Request) -> EpisodeStart:
        body = parse_body(await request.body(), EpisodeRequest)
        return await run_in_threadpool(table.start, body, owner(request))

    @router.post(
        "/episodes/{episode_id}/step", response_model=StepResult, openapi_extra=doc(StepRequest)
    )
    async def step(episode_id: str, request: Request) -> StepResult:
        body = parse_body(await request.body(), StepRequest)
        return await run_in_threadpool(table.step, episode_id, body, owner(request))

    @router.delete("/episodes/{episode_id}")
    async def close(episode_id: str, request: Request) -> dict[str, str]:
        table.close(episode_id, owner(request))
        return {"deleted": episode_id}

    return router


def mount_tasks(
    api: FastAPI,
    body_doc: BodyDoc | None = None,
    owner_of: OwnerOf | None = None,
    **include: Any,
) -> list[str]:
    """Every registered task whose package is importable, at ``/tasks/{name}/...`` of
    ``api`` (its middleware, so its keys, guard them; ``owner_of`` keeps each tenant's
    episodes its own). Returns the names mounted."""
    mounted = [name for name in task_names() if installed(name)]
    for name in mounted:
        router = task_router(name, body_doc=body_doc, owner_of=owner_of)
        api.include_router(router, prefix=f"/tasks/{name}", **include)
    return mounted


def task_app(task: str | type[Task], api_key: str | None = None) -> FastAPI:
    """A standalone app serving one task at the root; with ``api_key``, every route but
    ``/healthz`` needs ``Authorization: Bearer <api_key>``."""
    router = task_router(task)
    name = task if isinstance(task, str) else task.info.name
    app = FastAPI(title=f"vlmtune task {name}", docs_url=None, redoc_url=None)
    app.include_router(router, dependencies=[Depends(_key_check(api_key))])

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "task": name}

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, e: Exception) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(NotFound)
    async def not_found(_: Request, e: Exception) -> JSONResponse:
        return _error(404, str(e.args[0]) if e.args else "not found")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()[:10]
        )
        return _error(400, f"invalid request: {problems}")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": clipped(message)}, status)


def _key_check(api_key: str | None) -> Any:
    def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise HTTPException(
                401, "missing or invalid API key (send Authorization: Bearer <key>)"
            )

    return check


class HttpTaskClient:
    """A ``TaskClient`` over HTTP (sync, thread-safe: one pooled ``httpx.Client``).

    ``base_url`` is where the four routes live: ``http://host:8100`` for
    ``vlmtune tasks serve``, ``http://host:8000/tasks/lamp`` under ``vlmtune serve``.
    Every refusal or transport failure raises ``TaskError`` (status 0: unreachable).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_connections: int = 64,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections),
        )
        self._info: TaskInfo | None = None

    def info(self) -> TaskInfo:
        if self._info is None:  # a task's info never changes
            self._info = TaskInfo.model_validate(self._call("GET", "/info"))
        return self._info

    def start(self, request: EpisodeRequest) -> EpisodeStart:
        return EpisodeStart.model_validate(self._call("POST", "/episodes", request.model_dump()))

    def step(self, episode_id: str, request: StepRequest) -> StepResult:
        body = request.model_dump(exclude_none=True)
        return StepResult.model_validate(self._call("POST", f"/episodes/{episode_id}/step", body))

    def close(self, episode_id: str) -> None:
        self._call("DELETE", f"/episodes/{episode_id}")

    def shutdown(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> HttpTaskClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise TaskError(0, f"{method} {self.base_url}{path} failed: {e}") from None
        if response.status_code >= 400:
            raise TaskError(response.status_code, _detail(response))
        try:
            return response.json()
        except ValueError:
            raise TaskError(
                response.status_code, f"{method} {path} answered non-JSON: {response.text[:200]}"
            ) from None


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else response.text[:500] or response.reason_phrase


class TaskAppThread:
    """``task_app`` on a free loopback port in a background thread (tests, benchmarks)."""

    def __init__(self, task: str | type[Task], api_key: str | None = None) -> None:
        import uvicorn

        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto
        # says TCP, and without it every response waits ~40 ms for a delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(task_app(task, api_key), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TaskAppThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the task app did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
