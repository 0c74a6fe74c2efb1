"""The hosted trainer's CLI (synth-ai 0.2.x) against this server.

The requests are the CLI's own, recorded in ``tests/server/synth_fixtures/`` (each
names the synth-ai file that builds it); the checks are on the fields the CLI reads,
with the types it reads them as. The package itself is not a dependency.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.recipes.test_sft import write_rows
from vlmtune.config import load_job
from vlmtune.server import ServerThread, synth, synth_config
from vlmtune.server.auth import create_key
from vlmtune.server.store import Store

FIXTURES = Path(__file__).parent / "synth_fixtures"
CLI = json.loads((FIXTURES / "cli_requests.json").read_text())
FT_VL = json.loads((FIXTURES / "create_job_ft_vl.json").read_text())
EXAMPLES = json.loads((FIXTURES / "create_job_hosted_examples.json").read_text())["payloads"]
# The name the CLI insists on (its allow-list), served by the tiny model.
ALIASES = {"qwen/qwen3-vl-4b-instruct": "tiny-qwen3-vl"}
UNKNOWN_JOB = "job-000000000000"
UNKNOWN_FILE = "file-000000000000000000000000"


@pytest.fixture(scope="module")
def synth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path_factory.mktemp("synth-server"), model_aliases=ALIASES).start()
    srv.keys = {  # type: ignore[attr-defined]
        tenant: create_key(srv.context.store, tenant, tenant=tenant)
        for tenant in ("default", "other")
    }
    yield srv
    srv.stop()


def client(srv: ServerThread, tenant: str | None = "default") -> httpx.Client:
    headers = {} if tenant is None else {"Authorization": f"Bearer {srv.keys[tenant]}"}  # type: ignore[attr-defined]
    return httpx.Client(base_url=srv.url, headers=headers, timeout=120)


def path_of(step: str, **ids: str) -> str:
    return str(CLI[step]["path"]).format(**ids)


def upload(api: httpx.Client, path: Path) -> httpx.Response:
    """The CLI's upload (utils.py post_multipart): field ``file``, ``purpose=fine-tune``."""
    ((field, (_, content_type)),) = CLI["upload"]["files"].items()
    return api.post(
        CLI["upload"]["path"],
        data=CLI["upload"]["data"],
        files={field: (path.name, path.read_bytes(), content_type)},
    )


def create_body(train_id: str, val_id: str | None) -> dict[str, Any]:
    """The recorded body with the upload ids set where cli.py sets them."""
    body = copy.deepcopy(FT_VL["request"])
    body["training_file_id"] = train_id
    if val_id:
        body["metadata"]["effective_config"]["data"]["validation_files"] = [val_id]
    return body


def wait_terminal(api: httpx.Client, job_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = api.get(path_of("status", id=job_id)).json()
        assert isinstance(status["status"], str) and isinstance(status["updated_at"], str)
        if status["status"] in CLI["status"]["terminal"] or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def test_the_cli_flow_trains_and_answers_every_field_the_cli_reads(synth_server, tmp_path):
    api = client(synth_server)
    write_rows(tmp_path / "train.jsonl", 16)  # 16 vision rows and one bad line: 2 steps
    write_rows(tmp_path / "val.jsonl", 2)

    r = upload(api, tmp_path / "train.jsonl")
    assert r.status_code == 200, r.text
    train = r.json()
    assert isinstance(train["id"], str)
    report = train["validation"]
    assert (report["rows"], report["valid"], report["dropped"]) == (17, 16, 1)
    assert "not valid JSON" in report["dropped_rows"][0]["reason"]
    val_id = upload(api, tmp_path / "val.jsonl").json()["id"]
    ready = api.get(path_of("file_status", id=train["id"])).json()
    assert ready["status"] in CLI["file_status"]["ready"]

    sent = create_body(train["id"], val_id)
    r = api.post(CLI["create"]["path"], json=sent)
    assert r.status_code in CLI["create"]["ok"], r.text
    job_id = r.json().get("job_id") or r.json().get("id")
    assert isinstance(job_id, str)
    r = api.post(path_of("start", id=job_id), json=CLI["start"]["json"])
    assert r.status_code in CLI["start"]["ok"], r.text

    final = wait_terminal(api, job_id)
    assert final["status"] == "succeeded", final
    assert final["model"] == "Qwen/Qwen3-VL-4B-Instruct" and final["base_model"] == "tiny-qwen3-vl"
    assert final["hyperparameters"] == sent["hyperparameters"]  # echoed as sent
    model_id = final["fine_tuned_model"]
    assert isinstance(model_id, str)
    assert model_id in [m["id"] for m in api.get("/v1/models").json()["data"]]

    events = api.get(path_of("events", id=job_id), params=CLI["events"]["params"]).json()["events"]
    for e in events:
        assert isinstance(e["seq"], int) and isinstance(e["data"], dict)
        assert all(isinstance(e[k], str) for k in ("type", "message", "level", "created_at"))
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert events[-1]["type"] in CLI["events"]["terminal_success"]
    notes = [e["message"] for e in events if e["type"] == "vlmtune.config"]
    assert any(n.startswith("hyperparameters.parallelism.fsdp = False is ignored (") for n in notes)
    assert (
        "compute.sharding: None -> 'shard_grad_op' (from "
        "hyperparameters.parallelism.deepspeed_stage = 2: FSDP2's ZeRO-2 sharding)" in notes
    )
    assert "hyperparameters.eval_every: None -> 2 (from hyperparameters.eval_steps)" in notes
    drops = {e["data"]["file_id"]: e for e in events if e["type"] == "vlmtune.data"}
    assert set(drops) == {train["id"], val_id}  # each upload has its bad line
    assert drops[train["id"]]["level"] == "warning"
    assert (
        f"{train['id']}: 1 of 17 rows dropped (line 17: not valid JSON"
        in (drops[train["id"]]["message"])
    )
    later = api.get(path_of("events", id=job_id), params={"since_seq": seqs[-1], "limit": 200})
    assert later.json()["events"] == []

    points = api.get(path_of("metrics", id=job_id), params=CLI["metrics"]["params"]).json()[
        "points"
    ]
    loss = [p for p in points if p["name"] == "train.loss"]
    assert [p["step"] for p in loss] == [1, 2] and all(isinstance(p["value"], float) for p in loss)
    assert [p["step"] for p in points if p["name"] == "val.loss"] == [2]  # eval_steps = 2
    assert all(isinstance(p["created_at"], str) for p in points)
    after = api.get(path_of("metrics", id=job_id), params={"after_step": 1, "name": "train.loss"})
    assert [p["step"] for p in after.json()["points"]] == [2]
    newest = api.get(path_of("metrics", id=job_id), params={"limit": 1}).json()["points"]
    assert newest == points[-1:]  # without a cursor the CLI must see the newest

    timeline = api.get(path_of("timeline", id=job_id)).json()["events"]
    phases = [t["phase"] for t in timeline]
    assert phases[0] == "created" and "running" in phases and phases[-1] == "succeeded"
    assert all(isinstance(t["created_at"], str) for t in timeline)

    other = client(synth_server, "other")  # another tenant sees none of it
    assert other.get(path_of("status", id=job_id)).status_code == 404
    assert other.get(path_of("file_status", id=train["id"])).status_code == 404
    r = other.post(CLI["create"]["path"], json=create_body(train["id"], None))
    assert r.status_code == 400 and any(
        p.startswith("training_file_id (job.data): no uploaded file") for p in r.json()["problems"]
    )


def test_a_file_without_a_trainable_row_is_refused_and_removed(synth_server, tmp_path):
    api = client(synth_server)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json\n{"messages": []}\n')
    before = api.get("/v1/files").json()["data"]
    r = upload(api, bad)
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert "no trainable row in 2" in detail and "line 1: not valid JSON" in detail
    assert api.get("/v1/files").json()["data"] == before


def test_a_refused_job_names_each_problem_and_queues_nothing(synth_server, tmp_path):
    api = client(synth_server)
    write_rows(tmp_path / "train.jsonl", 2)
    file_id = upload(api, tmp_path / "train.jsonl").json()["id"]
    jobs_before = len(synth_server.context.jobs.list())
    cases = {
        "training_type": {"training_type": "rl_online"},
        "hyperparameters.learning_rate": {"hyperparameters": {"n_epochs": 1, "learning_rate": -1}},
        "training_file_id (job.data): no uploaded file": {"training_file_id": UNKNOWN_FILE},
    }
    for expected, change in cases.items():
        r = api.post(CLI["create"]["path"], json=create_body(file_id, None) | change)
        assert r.status_code == 400, r.text
        assert any(p.startswith(expected) for p in r.json()["problems"]), r.json()
        assert isinstance(r.json()["detail"], str)
    assert len(synth_server.context.jobs.list()) == jobs_before


def test_an_unknown_id_is_404_and_a_missing_key_is_401(synth_server):
    api = client(synth_server)
    for step in ("status", "events", "metrics", "timeline"):
        r = api.get(path_of(step, id=UNKNOWN_JOB))
        assert r.status_code == 404 and UNKNOWN_JOB in r.json()["detail"], step
    assert api.post(path_of("start", id=UNKNOWN_JOB), json={}).status_code == 404
    # 404 is what the CLI's readiness check keeps polling on (cli.py _wait_for_training_file)
    assert api.get(path_of("file_status", id=UNKNOWN_FILE)).status_code == 404
    anonymous = client(synth_server, None)
    for method, path in (("POST", CLI["upload"]["path"]), ("POST", CLI["create"]["path"]),
                         ("GET", path_of("status", id=UNKNOWN_JOB))):  # fmt: skip
        assert anonymous.request(method, path).status_code == 401, path


@pytest.mark.parametrize(
    ("name", "variety", "sharding"),
    [
        ("hosted_ft_vl", "qlora", "replicate"),
        ("pokemon_vl_fft", "fft", "full_shard"),
        ("crafter_vlm_qlora", "qlora", "replicate"),
    ],
)
def test_the_hosted_examples_become_jobs_vlmtune_accepts(tmp_path, name, variety, sharding):
    body = dict(EXAMPLES[name]["request"], training_file_id=UNKNOWN_FILE)
    raw, notes = synth_config.hosted_job(body, "tiny-qwen3-vl", "job")
    (tmp_path / "job.toml").write_text(synth_config.toml_text(raw))
    job = load_job(tmp_path / "job.toml", method="sft")
    assert (job.algorithm.variety, job.compute.sharding) == (variety, sharding)
    assert job.hyperparameters.learning_rate == body["hyperparameters"]["learning_rate"]
    assert all(" is ignored (" in n or " -> " in n for n in notes)
    if name == "crafter_vlm_qlora":  # evaluation keys written under [hyperparameters.parallelism]
        assert job.hyperparameters.eval_every == 100
        everything = "\n".join(notes + synth_config.dialect_notes(raw))
        assert "hyperparameters.parallelism.deepspeed_stage = 2 is ignored (" in everything


def test_a_resumed_jobs_old_failure_does_not_end_the_cli_stream(tmp_path):
    store = Store(tmp_path / "server.db")
    store.add_job("job-1", "toml", "x", "running", {}, "default")
    for kind in ("created", "running", "failed", "queued", "running"):
        store.add_event("job-1", kind, kind)
    row = store.job("job-1")
    assert row is not None
    types = [synth.event_json(row, e)["type"] for e in store.events("job-1")]
    assert "sft.job.failed" not in types and "sft.attempt.failed" in types
    phases = [t["phase"] for t in synth.timeline_json(store, row, 200)["events"]]
    assert phases == ["created", "running", "failed (resumed)", "queued", "running"]

    store.add_event("job-1", "interrupted", "the server stopped")
    store.update_job("job-1", state="interrupted", error=None)
    row = store.job("job-1")
    assert row is not None
    status = synth.job_json(tmp_path / "jobs", row)
    assert status["status"] == "failed" and "/start resumes it" in status["error"]
    last = synth.event_json(row, store.events("job-1")[-1])
    assert (last["type"], last["level"]) == ("sft.job.interrupted", "warning")
    store.close()
