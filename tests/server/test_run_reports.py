"""A Tinker-protocol run's steps, recorded by the server, and the report page they make.

A client's own loop drives the run through the HTTP SDK; the server writes one
``metrics.jsonl`` record per ``optim_step`` into the run's folder, and serves the page
of that folder at ``/api/v1/training_runs/{id}/report`` (a key, or a link's token).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import assistant, image_part, user
from vlmtune.cli import app as cli_app
from vlmtune.sdk import ServiceClient
from vlmtune.sdk.http import HttpTrainingClient
from vlmtune.server import ServerThread
from vlmtune.server.auth import create_key
from vlmtune.server.run_metrics import RunMetrics
from vlmtune.types import AdamParams

MODEL = "tiny-qwen3-vl"
LEARNING_RATES = [1e-3, 5e-4, 2.5e-4]


def train(tc: HttpTrainingClient, learning_rates: list[float]) -> None:
    datum = tc.datum_from_messages([user(image_part(32, 32, seed=1), "Digit?"), assistant("1")])
    for lr in learning_rates:
        tc.forward_backward([datum, datum], "cross_entropy").result()
        tc.optim_step(AdamParams(learning_rate=lr)).result()


def records(server: ServerThread, run_id: str) -> list[dict]:
    folder = Path(server.context.store.run(run_id)["dir"])
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def figure_paths(html: str, title: str) -> list[str]:
    """The ``d`` of each series drawn in the figure titled ``title``."""
    figure = re.search(rf"<figure><figcaption><b>{title}\.</b>.*?</figure>", html, re.S)
    assert figure, f"no {title} figure"
    return re.findall(r'<path class="series"[^>]* d="([^"]*)"', figure.group(0))


@pytest.fixture(scope="module")
def run_id(server: ServerThread, key: str) -> str:
    tc = ServiceClient(base_url=server.url, api_key=key).create_training_client(MODEL, lora_rank=4)
    assert isinstance(tc, HttpTrainingClient)
    train(tc, LEARNING_RATES)
    return tc.model_id


def test_each_optim_step_is_one_record_of_the_recipes_shape(server, run_id):
    steps = records(server, run_id)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["learning_rate"] for r in steps] == LEARNING_RATES
    for r in steps:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["examples"] == 2 and r["tokens"] > 2
        assert r["step_s"] > 0 and r["examples_per_s"] == pytest.approx(2 / r["step_s"])


def test_the_page_opens_by_its_link_without_a_key_and_draws_each_step(server, key, run_id):
    tc = ServiceClient(base_url=server.url, api_key=key).training_client_for(run_id)
    link = tc.report_link()
    assert link["url"].startswith(f"{server.url}/api/v1/training_runs/")
    browser = httpx.Client(timeout=60)  # no key, as a browser
    page = browser.get(link["url"])
    assert page.status_code == 200, page.text
    assert page.headers["cache-control"] == "no-store"
    html = page.text
    assert [len(re.findall(r"[ML]", d)) for d in figure_paths(html, "Loss")] == [3]
    assert len(re.findall(r"[ML]", figure_paths(html, "Learning rate")[0])) == 3
    assert run_id in html and MODEL in html and ">running<" in html
    assert "Tinker-protocol run" in html  # not taken for a recipe's SFT
    # A client's loop has no job: no eval, data or settings sections, no job-only advice.
    for job_only in ("<h2>Evaluation", "<h2>Data", "<h2>Settings applied", "summary.json yet"):
        assert job_only not in html, job_only
    assert "records each optimizer step your loop makes: 3 so far" in html

    token = link["url"].split("token=")[1]
    bad = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    r = browser.get(link["url"].split("?")[0], params={"token": bad})
    assert r.status_code == 401 and "not valid for this page" in r.json()["detail"]
    # The token opens that page only, not the run's other routes.
    r = browser.get(f"{server.url}/api/v1/training_runs/{run_id}", params={"token": token})
    assert r.status_code == 401


def test_another_tenant_gets_what_an_unknown_run_gets(server, run_id):
    other = create_key(server.context.store, "run-report", tenant="run-report-b")
    b = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other}"})
    for suffix in ("report", "report_link"):
        theirs = b.get(f"/api/v1/training_runs/{run_id}/{suffix}")
        unknown = b.get(f"/api/v1/training_runs/sess-0000000000000000:train:0/{suffix}")
        assert theirs.status_code == unknown.status_code == 404
        assert "unknown training run" in theirs.json()["detail"]


def test_the_cli_prints_the_link(server, key, run_id):
    out = CliRunner().invoke(
        cli_app, ["runs", "report", run_id, "--server", server.url, "--api-key", key]
    )
    assert out.exit_code == 0, out.output
    url = out.output.strip()
    assert "/report?token=" in url and httpx.get(url, timeout=60).status_code == 200
    missing = CliRunner().invoke(
        cli_app, ["runs", "report", "sess-0:train:9", "--server", server.url, "--api-key", key]
    )
    assert missing.exit_code == 1 and "unknown training run" in missing.output


def test_a_run_that_cannot_record_still_trains_and_says_so_once(server, key, caplog):
    tc = ServiceClient(base_url=server.url, api_key=key).create_training_client(MODEL, lora_rank=4)
    folder = Path(server.context.store.run(tc.model_id)["dir"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("a file where the run's folder would be")  # every write fails
    with caplog.at_level(logging.WARNING, logger="vlmtune.server"):
        train(tc, [1e-3, 1e-3])
    assert tc.get_info()["step"] == 2
    warned = [r for r in caplog.records if "cannot record metrics" in r.getMessage()]
    assert len(warned) == 1 and tc.model_id in warned[0].getMessage()
    page = httpx.get(tc.report_link()["url"], timeout=60)
    assert page.status_code == 200 and "No step recorded yet" in page.text


def test_a_step_recorded_again_replaces_it_and_the_later_ones(tmp_path):
    params = AdamParams(learning_rate=1e-3)
    first = RunMetrics(tmp_path, "r")
    for step in (1, 2, 3):
        first.optim_step(step, params, {"grad_norm": 1.0})
    again = RunMetrics(tmp_path, "r")  # a restart from the state saved at step 1
    again.optim_step(2, AdamParams(learning_rate=5e-4), {"grad_norm": 1.0})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["learning_rate"]) for r in lines] == [(1, 1e-3), (2, 5e-4)]
    assert "loss" not in lines[0] and "step_s" not in lines[0]  # no forward_backward seen
