"""A job's report page on the server, and the signed links a browser opens it by.

The jobs here are rows with a hand-built run directory (``tests/report/run_dirs``): the
routes are under test, not training (``test_jobs`` runs a real job and opens its page).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.report.run_dirs import make_run
from vlmtune.server import ServerThread
from vlmtune.server.auth import Identity, create_key
from vlmtune.server.report_links import LINK_TTL_S, ReportLinks, load_secret


def add_toml_job(server: ServerThread, job_id: str, tenant: str, run_dir: Path | None) -> str:
    store = server.context.store
    store.add_job(job_id, "toml", f"{job_id}-name", "running", {"type": "sft"}, tenant)
    if run_dir is not None:
        store.update_job(job_id, run_dir=str(run_dir))
    return job_id


@pytest.fixture(scope="module")
def jobs(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("report-pages")
    tag = f"{time.time_ns() % 10**12:012d}"
    return {
        "a": add_toml_job(server, f"job-r{tag[1:]}", "report-a",
                          make_run(folder / "a", "sft", right=2, wrong=1)),
        "queued": add_toml_job(server, f"job-q{tag[1:]}", "report-a", folder / "q" / "run"),
    }  # fmt: skip


def client(server: ServerThread, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def test_the_page_with_a_key_and_a_link_without_one(server, jobs):
    a = client(server, create_key(server.context.store, "report", tenant="report-a"))
    page = a.get(f"/v1/jobs/{jobs['a']}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Predictions at step 40: 2 of 3 right" in page.text
    assert ">running<" in page.text  # the job's state, not a guess from the files

    link = a.get(f"/v1/jobs/{jobs['a']}/report_link").json()
    assert link["expires_at"] > time.time() + LINK_TTL_S - 60
    assert link["url"].startswith(f"{server.url}/v1/jobs/{jobs['a']}/report?token=")
    browser = client(server)  # no key, as a browser
    opened = browser.get(link["url"])
    assert opened.status_code == 200 and "Predictions at step 40" in opened.text
    assert opened.headers["cache-control"] == "no-store"
    assert opened.headers["referrer-policy"] == "no-referrer"

    # The token opens that page only: not another job's, not another route, not a POST.
    token = link["url"].split("token=")[1]
    for method, path in [
        ("GET", f"/v1/jobs/{jobs['queued']}/report"),
        ("GET", f"/v1/jobs/{jobs['a']}/report_link"),  # no minting links with a link
        ("GET", f"/v1/jobs/{jobs['a']}"),
        ("POST", f"/v1/jobs/{jobs['a']}/cancel"),
    ]:
        r = browser.request(method, path, params={"token": token})
        assert r.status_code == 401, (method, path, r.text)
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    r = browser.get(f"/v1/jobs/{jobs['a']}/report", params={"token": tampered})
    assert r.status_code == 401 and "not valid for this page" in r.json()["detail"]
    assert browser.get(f"/v1/jobs/{jobs['a']}/report").status_code == 401  # no token


def test_an_expired_link_says_so(server, jobs):
    links = ReportLinks(load_secret(server.config.data_dir))
    path = f"/v1/jobs/{jobs['a']}/report"
    token, _ = links.token(path, Identity("report-a"), now=time.time() - LINK_TTL_S - 1)
    r = client(server).get(path, params={"token": token})
    assert r.status_code == 401 and "expired" in r.json()["detail"]


def test_another_tenant_gets_no_page_and_no_link(server, jobs):
    b_key = create_key(server.context.store, "report", tenant="report-b")
    b = client(server, b_key)
    assert b.get(f"/v1/jobs/{jobs['a']}/report").status_code == 404
    assert b.get(f"/v1/jobs/{jobs['a']}/report_link").status_code == 404
    # A link B made for its own tenant does not open A's page either.
    links = ReportLinks(load_secret(server.config.data_dir))
    path = f"/v1/jobs/{jobs['a']}/report"
    token, _ = links.token(path, Identity("report-b"))
    assert client(server).get(path, params={"token": token}).status_code == 404
    operator = client(server, create_key(server.context.store, "report", operator=True))
    assert operator.get(path).status_code == 200


def test_a_queued_job_has_a_page_and_a_trainer_job_none(server, jobs, key):
    a = client(server, create_key(server.context.store, "report", tenant="report-a"))
    page = a.get(f"/v1/jobs/{jobs['queued']}/report")
    assert page.status_code == 200 and "No step recorded yet" in page.text
    trainer = (
        client(server, key)
        .post("/v1/jobs/trainer", json={"base_model": "tiny-qwen3-vl", "lora_rank": 4})
        .json()["id"]
    )
    r = client(server, key).get(f"/v1/jobs/{trainer}/report")
    assert r.status_code == 404 and "trainer job" in r.json()["detail"]
