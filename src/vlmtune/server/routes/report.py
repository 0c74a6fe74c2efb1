"""Report pages of jobs and runs (the page of ``vlmtune report``), and links a browser opens.

    GET /v1/jobs/{job_id}/report                    the HTML page (a key, or a link's ?token=)
    GET /v1/jobs/{job_id}/report_link               {"url", "expires_at"}: it with a token
    GET /api/v1/training_runs/{run_id}/report       a Tinker-protocol run's page
    GET /api/v1/training_runs/{run_id}/report_link  ... and its link

A browser sends no key, so ``report_link`` (asked with a key) signs a token for the
one page; ``server/report_links.py`` says what a token grants. Every route looks the
job or run up with ``tenant_of``, a token's tenant included: another tenant's is
unknown. A TOML job's page is its run directory's report, its status the job's state.
A trainer job has no page of its own (its client's loop is the recipe); each of its
runs has one, drawn from the ``metrics.jsonl`` the server records in the run's folder
(``server/run_metrics.py``), its status from the database.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from vlmtune.protocol.errors import NotFound, shown
from vlmtune.report import ReportError, RunData, build_report, read_run, render_page
from vlmtune.report.run_data import RUNNING_WITHIN_S
from vlmtune.server.context import SafeJSON, caller, ctx, tenant_of
from vlmtune.server.openapi import ERROR_RESPONSES
from vlmtune.server.report_links import TOKEN_PARAM, ReportLinks

router = APIRouter()
COMPONENTS = "#/components/schemas/"


class ReportLink(BaseModel):
    url: str = Field(description="the report page, with a token that opens it without a key")
    expires_at: int = Field(description="when the token expires (epoch seconds)")


# What a run's page names as its method: the client's loop decides what its loss means.
RUN_METHOD = "Tinker-protocol run (the client's own loop)"


def report_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/report"


def run_report_path(run_id: str) -> str:
    return f"/api/v1/training_runs/{run_id}/report"


def job_report(job: dict[str, Any]) -> str:
    """The page of a TOML job: its run directory's, or, before the run has written
    anything (queued), an empty one showing the job's state."""
    if job["kind"] != "toml":
        raise NotFound(
            f"job {job['id']} is a trainer job: each of its runs has a report page "
            "(vlmtune runs report RUN_ID); only TOML jobs have a job report page"
        )
    run_dir = job.get("run_dir")  # None while submitted: no folder chosen yet
    if run_dir:
        try:
            return build_report(Path(run_dir), status=job["state"])
        except ReportError:  # nothing written there yet
            pass
    config = {"job": {"name": job["name"]}, "algorithm": {"method": job["config"].get("type")}}
    empty = RunData(Path(run_dir or job["id"]), config, [], [])
    return render_page(empty, status=job["state"])


def run_status(row: dict[str, Any], now: float | None = None) -> str:
    """deleted (its trainer job was), running (a request lately), else idle: a client's
    loop may always come back, so a quiet run is not stopped."""
    if row["deleted"]:
        return "deleted"
    now = time.time() if now is None else now
    return "running" if now - row["last_request"] < RUNNING_WITHIN_S else "idle"


def run_report(row: dict[str, Any]) -> str:
    """The page of a Tinker-protocol run: its folder's records (none yet: an empty one)."""
    folder = Path(row["dir"])
    try:
        run = read_run(folder)
    except ReportError:  # no step recorded yet (the folder may not exist)
        run = RunData(folder, {}, [], [])
    job = {"name": row["id"], "model": row["base_model"]}
    config = {**run.config, "job": job, "algorithm": {"method": RUN_METHOD}}
    run = replace(run, config=config, client_loop=True)
    return render_page(run, status=run_status(row))


# The page is HTML and its errors JSON, as every route's: the error answers are given
# as content here, since FastAPI would document a model's under the page's media type.
PAGE_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {
        "description": answer["description"],
        "content": {"application/json": {"schema": {"$ref": f"{COMPONENTS}ErrorBody"}}},
    }
    for status, answer in ERROR_RESPONSES.items()
}


@router.get("/v1/jobs/{job_id}/report", response_class=HTMLResponse, responses=PAGE_ERRORS)
async def get_job_report(
    job_id: str,
    request: Request,
    token: str | None = Query(
        None, max_length=512, description="a report link's token (in place of an API key)"
    ),
) -> HTMLResponse:
    """The job's report page: curves, data report, settings applied, eval predictions.
    Open it in a browser with the URL ``report_link`` gives (its ``token`` stands in
    for the API key a browser cannot send)."""
    job = ctx(request).jobs.get(job_id, tenant_of(request))
    return _page(await run_in_threadpool(job_report, job))


@router.get("/v1/jobs/{job_id}/report_link", response_model=ReportLink)
async def get_job_report_link(job_id: str, request: Request) -> SafeJSON:
    """A URL of the job's report page that a browser opens without a key, for a day."""
    job = ctx(request).jobs.get(job_id, tenant_of(request))
    return _signed_link(request, report_path(job["id"]))


def _page(html: str) -> HTMLResponse:
    # no-store: the token is in the URL; referrer: never send that URL to another site
    return HTMLResponse(
        html, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    )


def _signed_link(request: Request, path: str) -> SafeJSON:
    """``path``'s URL with a token that stands in for the caller's key for a day."""
    links: ReportLinks = request.app.state.report_links
    token, expires = links.token(path, caller(request))
    # The token signs the decoded path, which is what the server compares it with.
    url = f"{str(request.base_url).rstrip('/')}{quote(path)}?{TOKEN_PARAM}={token}"
    return SafeJSON({"url": url, "expires_at": expires})


def _run_row(request: Request, run_id: str) -> dict[str, Any]:
    """The run if the caller's tenant owns it (deleted too: its records outlive it)."""
    row = ctx(request).store.run(run_id, include_deleted=True, tenant=tenant_of(request))
    if row is None:
        raise NotFound(f"unknown training run {shown(run_id)}")
    return row


@router.get(
    "/api/v1/training_runs/{run_id}/report", response_class=HTMLResponse, responses=PAGE_ERRORS
)
async def get_run_report(
    run_id: str,
    request: Request,
    token: str | None = Query(
        None, max_length=512, description="a report link's token (in place of an API key)"
    ),
) -> HTMLResponse:
    """A Tinker-protocol run's report page: the loss, learning rate, gradient norm and
    throughput of each ``optim_step`` the server recorded. Open it in a browser with
    the URL ``report_link`` gives."""
    row = _run_row(request, run_id)
    return _page(await run_in_threadpool(run_report, row))


@router.get("/api/v1/training_runs/{run_id}/report_link", response_model=ReportLink)
async def get_run_report_link(run_id: str, request: Request) -> SafeJSON:
    """A URL of the run's report page that a browser opens without a key, for a day."""
    return _signed_link(request, run_report_path(_run_row(request, run_id)["id"]))
