"""The ASGI application: wiring, error mapping, and ways to run it (CLI or a thread).

Every client error maps to a 4xx with a readable ``detail`` (never a traceback):
``BadRequest`` 400, ``NotFound`` 404, oversized bodies 413, missing keys 401. An
unexpected exception is a 500 whose body names the exception; the traceback goes to
the server log only.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from vlmtune.protocol.errors import BadRequest, NotFound, clipped, shown
from vlmtune.protocol.proto import ProtoError
from vlmtune.server.auth import (
    IDENTITY_SCOPE_KEY,
    BodyTooLarge,
    GateMiddleware,
    Identity,
    KeyChecker,
    Receive,
    Scope,
    Send,
)
from vlmtune.server.context import SafeJSON, ServerConfig, ServerContext, tenant_of
from vlmtune.server.fireworks import account_scope
from vlmtune.server.inference import ModelPool
from vlmtune.server.jobs import JobRunner
from vlmtune.server.openapi import ERROR_RESPONSES, json_body, openapi_schema
from vlmtune.server.report_links import ReportLinks, load_secret
from vlmtune.server.runs import RunManager
from vlmtune.server.samplers import SamplerManager
from vlmtune.server.store import Store
from vlmtune.server.workers import FutureRegistry

log = logging.getLogger("vlmtune.server")
# Any job id: a Fireworks client names its trainer jobs itself.
_TRAINER_PREFIX = re.compile(r"^/trainer/([^/]+)(/.*)$")
# The Fireworks client's trainer gateway: /training/v1/rlorTrainerJobs/<account>/<job>/...
# (the job id is the client's choice).
_GATEWAY_PREFIX = re.compile(r"^/training/v1/rlorTrainerJobs/([^/]+)/([^/]+)(/.*)$")
_SURROGATES = re.compile("[\ud800-\udfff]")


class TrainerPrefix:
    """``/trainer/<job>/api/v1/...`` -> ``/api/v1/...``, tagging the request with the job.

    The whole prefix is the job's: a job the caller may not see (unknown, or another
    tenant's) answers 404 for every path under it.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            routed = self._route(scope)
            if routed is not None:
                job_id, rest, refusal = routed
                if refusal is not None:
                    await _error(404, refusal)(scope, receive, send)
                    return
                scope = dict(scope, path=rest, raw_path=rest.encode())
                scope["vlmtune.trainer_job"] = job_id
        await self.app(scope, receive, send)

    def _route(self, scope: Scope) -> tuple[str, str, str | None] | None:
        """(job, path under the prefix, why it is refused or None) for a trainer path."""
        m = _TRAINER_PREFIX.match(scope["path"])
        g = _GATEWAY_PREFIX.match(scope["path"])
        if m is None and g is None:
            return None
        identity: Identity = scope[IDENTITY_SCOPE_KEY]  # the gate ran first
        if m is not None:
            known = self.app.state.ctx.store.job(m.group(1), identity.sees) is not None
            return m.group(1), m.group(2), None if known else f"unknown job {m.group(1)!r}"
        assert g is not None
        account, job_id, rest = g.groups()
        return job_id, rest, self._gateway_refusal(identity, account, job_id)

    def _gateway_refusal(self, identity: Identity, account: str, job_id: str) -> str | None:
        """Why a Fireworks trainer endpoint does not serve (a stopped trainer has none,
        so its healthz is not 200 either); None: it serves."""
        tenant = account_scope(identity, account)
        job = None if tenant is None else self.app.state.ctx.store.job(job_id, tenant)
        if job is None or job["kind"] != "trainer":
            return f"unknown rlorTrainerJob {shown(job_id)}"
        if job["state"] != "running":
            return f"rlorTrainerJob {job_id} is {job['state']}, not running"
        return None


class AnsweredOnce:
    """Keeps a failed request from taking its connection down with it.

    Starlette answers an unexpected exception with the 500 below and then re-raises it,
    and uvicorn closes a connection whose app raised: a client's next request on that
    keep-alive connection is reset. The exception was logged by the handler; here it
    stops. One raised before any answer (outside the handlers) gets its 500 here.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except BodyTooLarge:
            raise  # the gate answers it
        except Exception as e:
            if started:
                return
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            response = _error(500, f"internal error: {type(e).__name__}: {e}")
            await response(scope, receive, send)


def _error(status: int, message: str) -> SafeJSON:
    kind = "invalid_request_error" if status < 500 else "server_error"
    # Whatever a handler echoed (a 60 MB id, a lone surrogate), the answer stays short
    # and encodable.
    message = _SURROGATES.sub("\ufffd", clipped(message))
    # ``detail`` for Tinker/FastAPI clients, ``error`` for OpenAI clients.
    return SafeJSON({"detail": message, "error": {"message": message, "type": kind}}, status)


def create_context(config: ServerConfig) -> ServerContext:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.data_dir / "server.db")
    pool = ModelPool(config.max_loaded_models)
    futures = FutureRegistry()
    runs = RunManager(store, config.data_dir, futures, gap_timeout=config.gap_timeout_s)
    jobs = JobRunner(
        store, config.data_dir, runs, config.max_concurrent_jobs,
        allowed_roots=config.allowed_data_roots,
    )  # fmt: skip
    samplers = SamplerManager(store, runs, pool)
    return ServerContext(config, store, runs, futures, pool, jobs, samplers)


def create_app(config: ServerConfig) -> GateMiddleware:
    """The full ASGI app (key and body-size gates around the FastAPI routes)."""
    from vlmtune.server.routes import ROUTERS
    from vlmtune.tasks.http import mount_tasks

    c = create_context(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        c.jobs.start()
        try:
            yield
        finally:
            c.jobs.close()
            c.runs.close()
            c.pool.close()
            c.store.close()

    api = FastAPI(title="vlmtune", lifespan=lifespan, docs_url=None, redoc_url=None)
    api.state.ctx = c
    for router in ROUTERS:
        api.include_router(router, responses=ERROR_RESPONSES)
    # /tasks/{name}/...: the same key gate; each tenant's episodes are its own.
    mount_tasks(api, json_body, owner_of=tenant_of, responses=ERROR_RESPONSES)
    api.openapi = lambda: openapi_schema(api)  # type: ignore[method-assign]

    @api.exception_handler(BadRequest)
    @api.exception_handler(ProtoError)
    async def bad_request(_: Request, e: Exception) -> SafeJSON:
        return _error(400, str(e))

    @api.exception_handler(NotFound)
    async def not_found(_: Request, e: Exception) -> SafeJSON:
        return _error(404, str(e.args[0]) if e.args else "not found")

    @api.exception_handler(BodyTooLarge)
    async def too_large(_: Request, e: Exception) -> SafeJSON:
        return _error(413, str(e))

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> SafeJSON:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()[:10]
        )
        return _error(400, f"invalid request: {problems}")

    @api.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> SafeJSON:
        return _error(e.status_code, str(e.detail))

    @api.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> SafeJSON:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    checker = KeyChecker(c.store, config.api_keys_file)
    links = ReportLinks(load_secret(config.data_dir))  # report pages a browser opens
    api.state.report_links = links
    app = GateMiddleware(
        AnsweredOnce(TrainerPrefix(api)),
        checker,
        int(config.max_body_mb * 2**20),
        links.check_scope,
    )
    app.state = api.state  # so callers holding the outer app reach the context
    return app


def run_server(config: ServerConfig, log_level: str = "info") -> None:
    import uvicorn

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=log_level)


class ServerThread:
    """A server in a background thread on a free loopback port (tests, benchmarks)."""

    def __init__(self, data_dir: str | Path, **options: Any) -> None:
        import uvicorn

        options.setdefault("port", 0)  # a free port
        self.config = ServerConfig(data_dir=Path(data_dir), **options)
        self.app = create_app(self.config)
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto
        # says TCP, and without it every response waits ~40 ms for a delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.config.host, self.config.port))
        self.port = self.sock.getsockname()[1]
        uv = uvicorn.Config(
            self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def context(self) -> ServerContext:
        return self.app.state.ctx

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
