"""Inputs at the edges get a short 4xx naming the field, on a connection that stays up.

Each case here was a 500, a reset connection, a 125 MB answer or a job left running
before issue 13: integers past SQLite's range, lone UTF-16 surrogates, huge ids,
unbounded trainer-job settings, non-finite waits.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from vlmtune.protocol.bodies import MAX_LORA_RANK
from vlmtune.server.app import AnsweredOnce

MODEL = "tiny-qwen3-vl"
BIG = str(2**70)


@pytest.fixture(scope="module")
def http(server, key):
    # One connection for the whole module: a reset anywhere fails every later case.
    with httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        limits=httpx.Limits(max_connections=1),
    ) as client:
        yield client


@pytest.fixture(scope="module")
def finished_job(http) -> str:
    job = http.post("/v1/jobs/trainer", json={"base_model": MODEL, "lora_rank": 4}).json()
    assert http.delete(f"/v1/jobs/{job['id']}").status_code == 200  # a trainer job's stop
    return job["id"]


def _refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text[:500]
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail


@pytest.mark.parametrize(
    ("query", "name"),
    [({"limit": BIG}, "limit"), ({"offset": BIG}, "offset"), ({"limit": -1}, "limit"),
     ({"offset": -1}, "offset"), ({"limit": 10**6}, "limit")],
)  # fmt: skip
def test_run_listing_bounds(http, query, name):
    _refused(http.get("/api/v1/training_runs", params=query), 400, name)


def test_run_listing_in_bounds(http):
    r = http.get("/api/v1/training_runs", params={"limit": 1000, "offset": 2**63 - 1})
    assert r.status_code == 200 and r.json()["training_runs"] == []


@pytest.mark.parametrize(
    ("query", "name"),
    [({"after": BIG}, "after"), ({"after": -1}, "after"), ({"wait": "nan"}, "wait"),
     ({"wait": "inf"}, "wait"), ({"wait": "-inf"}, "wait"), ({"wait": -1}, "wait")],
)  # fmt: skip
def test_event_bounds(http, finished_job, query, name):
    _refused(http.get(f"/v1/jobs/{finished_job}/events", params=query), 400, name)


def test_a_huge_wait_is_clamped_not_refused(http, finished_job):
    start = time.monotonic()
    r = http.get(f"/v1/jobs/{finished_job}/events", params={"wait": 1e300})
    assert r.status_code == 200 and time.monotonic() - start < 5  # a finished job: at once


SURROGATE_BODIES = [
    ("/api/v1/session_heartbeat", b'{"session_id": "\\ud800"}', "session_id"),
    ("/api/v1/get_info", b'{"model_id": "a\\udfffb"}', "model_id"),
    ("/api/v1/retrieve_future", b'{"request_id": "\\ud800"}', "request_id"),
    ("/v1/jobs/trainer", b'{"base_model": "tiny-qwen3-vl", "display_name": "\\ud800"}',
     "display_name"),
    ("/v1/chat/completions",
     b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/chat/completions",
     b'{"model": "x", "messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0]"),
    ("/api/v1/create_model",
     b'{"session_id": "s", "model_seq_id": 0, "base_model": "m", "user_metadata": {"\\ud800": 1}}',
     "user_metadata"),
    ("/api/v1/get_info", b'{"model_id": "\xed\xa0\x80"}', "model_id"),  # raw surrogate bytes
]  # fmt: skip


@pytest.mark.parametrize(("path", "raw", "field"), SURROGATE_BODIES)
def test_lone_surrogates_in_bodies(http, path, raw, field):
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    _refused(r, 400, field, "surrogate")


@pytest.mark.parametrize(
    "path",
    ["/api/v1/training_runs/%ED%A0%80", "/api/v1/training_runs/%ED%A0%80/checkpoints",
     "/v1/jobs/%ED%A0%80", "/v1/jobs/%ED%A0%80/events", "/api/v1/samplers/%ED%A0%80",
     "/v1/training_profiles/%ED%A0%80"],
)  # fmt: skip
def test_lone_surrogates_in_paths_are_unknown_ids(http, path):
    assert http.get(path).status_code == 404


def test_lone_surrogates_in_queries(http):
    assert http.get("/v1/jobs?kind=%ED%A0%80").json()["jobs"] == []


def test_huge_ids_are_not_echoed_in_full(http):
    huge = "x" * 5_000_000
    for r in (
        http.post("/api/v1/get_info", json={"model_id": huge}),
        http.post("/api/v1/session_heartbeat", json={"session_id": huge}),
        http.post("/api/v1/retrieve_future", json={"request_id": huge}),
        http.get(f"/api/v1/training_runs/{'y' * 10_000}"),  # as long as a request line goes
    ):
        assert r.status_code == 404 and len(r.content) < 10_000, len(r.content)
        assert "chars)" in r.json()["detail"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"lora_rank": 10**12}, "lora_rank"), ({"lora_rank": MAX_LORA_RANK + 1}, "lora_rank"),
     ({"lora_rank": -1}, "lora_rank"), ({"learning_rate": 0}, "learning_rate"),
     ({"learning_rate": -1e-4}, "learning_rate"),
     ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
     ({"gradient_accumulation_steps": 2**70}, "gradient_accumulation_steps"),
     ({"display_name": "n" * 10_000}, "display_name"),
     ({"training_shape_ref": "s" * 10_000}, "training_shape_ref"), ({"base_model": ""}, "base_model")],
)  # fmt: skip
def test_trainer_job_settings_are_bounded(http, changes, field):
    before = len(http.get("/v1/jobs", params={"kind": "trainer"}).json()["jobs"])
    r = http.post("/v1/jobs/trainer", json={"base_model": MODEL, **changes})
    _refused(r, 400, field)
    assert len(http.get("/v1/jobs", params={"kind": "trainer"}).json()["jobs"]) == before


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_trainer_job_non_finite_learning_rate(http, value):
    raw = b'{"base_model": "tiny-qwen3-vl", "learning_rate": ' + value + b"}"
    r = http.post("/v1/jobs/trainer", content=raw, headers={"Content-Type": "application/json"})
    _refused(r, 400, "learning_rate", "finite")


def test_the_lora_rank_bound_is_the_tinker_one(http):
    session = http.post("/api/v1/create_session", json={}).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": MODEL,
            "lora_config": {"rank": MAX_LORA_RANK + 1}}  # fmt: skip
    _refused(http.post("/api/v1/create_model", json=body), 400, "rank", str(MAX_LORA_RANK))


@pytest.mark.parametrize(
    ("body", "field"),
    [({"model_seq_id": 2**63}, "model_seq_id"), ({"model_seq_id": 0, "seq_id": 2**70}, "seq_id")],
)
def test_sequence_numbers_fit_in_64_bits(http, body, field):
    path = "/api/v1/create_model" if "seq_id" not in body else "/api/v1/optim_step"
    full = {"session_id": "s", "base_model": MODEL, "model_id": "m", **body}
    _refused(http.post(path, json=full), 400, field)


@pytest.mark.parametrize(
    ("raw", "words"),
    [(b"[" * 100_000 + b"]" * 100_000, ("not valid JSON",)),
     (b'{"model_id": ' + b"1" * 5000 + b"}", ("not valid JSON",)),
     (b'{"model_id": "m", "x": ' + b"[" * 50 + b"]" * 50 + b"}", ("nested deeper",))],
)  # fmt: skip
def test_pathological_json(http, raw, words):
    r = http.post("/api/v1/get_info", content=raw, headers={"Content-Type": "application/json"})
    _refused(r, 400, *words)


def test_the_connection_survives_all_of_the_above(http):
    # The module shares one connection (max_connections=1): it is still the first one.
    assert http.get("/api/v1/healthz").json() == {"status": "ok"}


# ---- AnsweredOnce, on its own ------------------------------------------------------------
def _run(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""}
    asyncio.run(AnsweredOnce(app)(scope, receive, send))
    return sent


def test_an_exception_after_the_answer_does_not_reach_the_server():
    async def answers_then_raises(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        raise RuntimeError("re-raised by Starlette after its 500")

    sent = _run(answers_then_raises)  # no exception: uvicorn keeps the connection
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


def test_an_exception_before_any_answer_is_a_500():
    async def raises(scope, receive, send):
        raise RuntimeError("boom")

    sent = _run(raises)
    assert sent[0]["status"] == 500 and b"RuntimeError: boom" in sent[1]["body"]
