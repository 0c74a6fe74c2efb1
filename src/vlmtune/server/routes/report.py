"""A job's report page (the page of ``vlmtune report``), and links a browser can open.

    GET /v1/jobs/{job_id}/report         the HTML page (a key, or a link's ?token=)
    GET /v1/jobs/{job_id}/report_link    {"url", "expires_at"}: that page with a token

A browser sends no key, so ``report_link`` (asked with a key) signs a token for the
one page; ``server/report_links.py`` says what a token grants. Both routes look the
job up with ``tenant_of``, a token's tenant included: another tenant's job is unknown.
A TOML job's page is its run directory's report, its status the job's state; a
trainer job has no run directory here (its client writes one), so it has no page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from vlmtune.protocol.errors import NotFound
from vlmtune.report import ReportError, RunData, build_report, render_page
from vlmtune.server.context import SafeJSON, caller, ctx, tenant_of
from vlmtune.server.openapi import ERROR_RESPONSES
from vlmtune.server.report_links import TOKEN_PARAM, ReportLinks

router = APIRouter()
COMPONENTS = "#/components/schemas/"


class ReportLink(BaseModel):
    url: str = Field(description="the report page, with a token that opens it without a key")
    expires_at: int = Field(description="when the token expires (epoch seconds)")


def report_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/report"


def job_report(job: dict[str, Any]) -> str:
    """The page of a TOML job: its run directory's, or, before the run has written
    anything (queued), an empty one showing the job's state."""
    if job["kind"] != "toml":
        raise NotFound(
            f"job {job['id']} is a trainer job: its client writes the run directory "
            "(vlmtune report RUN_DIR there); only TOML jobs have a report page here"
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
    page = await run_in_threadpool(job_report, job)
    # no-store: the token is in the URL; referrer: never send that URL to another site
    headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    return HTMLResponse(page, headers=headers)


@router.get("/v1/jobs/{job_id}/report_link", response_model=ReportLink)
async def get_job_report_link(job_id: str, request: Request) -> SafeJSON:
    """A URL of the job's report page that a browser opens without a key, for a day."""
    job = ctx(request).jobs.get(job_id, tenant_of(request))
    links: ReportLinks = request.app.state.report_links
    path = report_path(job["id"])
    token, expires = links.token(path, caller(request))
    url = f"{str(request.base_url).rstrip('/')}{path}?{TOKEN_PARAM}={token}"
    return SafeJSON({"url": url, "expires_at": expires})
