"""The Fireworks training control plane on `vlmtune serve`, request by request.

The requests are the ones the official client (fireworks-ai 1.2.30) and the cookbook
send (their order: /tmp/h2/fw_spec.md §2), made here with httpx so each answer can be
checked field by field; test_fireworks_client.py drives the client itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import png_data_url
from vlmtune.cli import app as cli_app
from vlmtune.cli.serve import model_aliases
from vlmtune.models.registry import HOSTED_MODEL_NAMES, aliased, parse_model_alias, same_model
from vlmtune.planning.shapes import get_shape
from vlmtune.server import ServerThread
from vlmtune.server import fireworks as fw
from vlmtune.server.auth import create_key, fireworks_spelling

HOSTED_8B = "accounts/fireworks/models/qwen3-vl-8b-instruct"
TENANT = "fw-control"
SHAPE = "accounts/fireworks/trainingShapes/qwen3-vl-8b-65k"
PROMPT = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    aliases = {HOSTED_8B: "tiny-qwen3-vl"}
    server = ServerThread(tmp_path_factory.mktemp("fw-control"), model_aliases=aliases).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(srv: ServerThread) -> str:
    """A key in the spelling the Fireworks client expects (fw_...)."""
    return fireworks_spelling(create_key(srv.context.store, "fw", tenant=TENANT))


@pytest.fixture(scope="module")
def cp(srv: ServerThread, key: str) -> Iterator[httpx.Client]:
    """The control plane as the client calls it: X-Api-Key."""
    with httpx.Client(base_url=srv.url, headers={"X-Api-Key": key}, timeout=120) as c:
        yield c


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()


def _create(
    cp: httpx.Client, job_id: str, shape: str | None = SHAPE, **body: Any
) -> httpx.Response:
    query = {"rlorTrainerJobId": job_id}
    if shape:
        query["trainingShape"] = shape
    config = {"baseModel": HOSTED_8B, "loraRank": body.pop("loraRank", 0), "learningRate": 1e-5}
    payload = {"serviceMode": True, "keepAlive": False, "dataset": "", "trainingConfig": config,
               "useReservation": True, "displayName": "vlm-sft", **body}  # fmt: skip
    return cp.post(f"/v1/accounts/{TENANT}/rlorTrainerJobs", params=query, json=payload)


def _result(c: httpx.Client, gw: str, r: httpx.Response) -> dict[str, Any]:
    rid = _ok(r)["request_id"]
    while True:
        out = _ok(c.post(f"{gw}/api/v1/retrieve_future", json={"request_id": rid}))
        if out.get("type") != "try_again":
            assert "error" not in out, out
            return out


# ---- pure parts -----------------------------------------------------------------------------
def test_names_aliases_and_pages():
    # One table maps every Qwen3-VL size's hosted name to its hub id (and back).
    assert set(HOSTED_MODEL_NAMES.values()) >= {
        "Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-235B-A22B-Instruct"
    }  # fmt: skip
    assert same_model(HOSTED_8B, "Qwen/Qwen3-VL-8B-Instruct") and same_model("a/b", "A/B")
    assert not same_model(HOSTED_8B, "Qwen/Qwen3-VL-4B-Instruct")
    assert parse_model_alias(f" {HOSTED_8B} = tiny-qwen3-vl") == (HOSTED_8B, "tiny-qwen3-vl")
    for bad in ("tiny-qwen3-vl", "=x", "x="):
        with pytest.raises(ValueError, match="NAME=PATH"):
            parse_model_alias(bad)
    table = model_aliases([f"{HOSTED_8B.upper()}=tiny-qwen3-vl"])
    assert aliased(HOSTED_8B, table) == "tiny-qwen3-vl" and aliased("other", table) == "other"
    with pytest.raises(ValueError, match="aliased twice"):
        model_aliases([f"{HOSTED_8B}=tiny-qwen3-vl", f"{HOSTED_8B}=tiny"])
    with pytest.raises(ValueError, match="/no/such/dir"):
        model_aliases(["x=/no/such/dir"])
    assert fw.page([1, 2, 3], 2, "") == ([1, 2], "2") and fw.page([1, 2, 3], 2, "2") == ([3], "")
    assert TIME.match(fw.rfc3339(1764441761.074849))
    keep = fw.version_filter(
        'snapshot.base_model="accounts/fireworks/models/qwen3-vl-8b-instruct" AND '
        'snapshot.trainer_mode="FORWARD_ONLY" AND snapshot.parameter_count>=1000 AND '
        "latest_validated=true"
    )
    assert {v["name"] for v in map(fw.shape_version, fw.published_shapes()) if keep(v)} == {
        f"accounts/fireworks/trainingShapes/{s}-forward-only/versions/v1"
        for s in ("qwen3-vl-8b-32k", "qwen3-vl-8b-32k-qlora-x2", "qwen3-vl-8b-65k")
    }


def test_cli_serve_refuses_a_bad_alias_and_keys_print_the_fireworks_spelling(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(cli_app, ["serve", "--data-dir", str(tmp_path), "--model-alias", "x"])
    assert bad.exit_code == 2 and "--model-alias 'x': expected NAME=PATH" in bad.output
    out = runner.invoke(
        cli_app, ["keys", "create", "--data-dir", str(tmp_path), "--style", "fireworks"]
    )
    assert out.exit_code == 0 and re.fullmatch(r"fw_[0-9a-f]{12}_\S+\n", out.output)
    wrong = runner.invoke(cli_app, ["keys", "create", "--data-dir", str(tmp_path), "--style", "x"])
    assert wrong.exit_code == 2


# ---- over HTTP ------------------------------------------------------------------------------
def test_key_spellings_account_and_shapes(srv, key, cp):
    tml = "tml-" + key.removeprefix("fw_")
    for headers in ({"X-Api-Key": key}, {"X-API-Key": tml}, {"Authorization": f"Bearer {key}"}):
        accounts = _ok(httpx.get(f"{srv.url}/v1/accounts?pageSize=2", headers=headers))
        assert accounts["accounts"] == [
            {"name": f"accounts/{TENANT}", "displayName": TENANT, "state": "READY"}
        ]
    assert httpx.get(f"{srv.url}/v1/accounts", headers={"X-Api-Key": key[:-1]}).status_code == 401
    # The snippet's first request, then the versioned name it returns.
    listed = _ok(
        cp.get(
            f"/v1/{SHAPE}/versions",
            params={"filter": "latest_validated=true", "pageSize": 1},
        )
    )["trainingShapeVersions"]
    assert len(listed) == 1
    version = _ok(cp.get(f"/v1/{listed[0]['name']}"))
    assert version == listed[0]
    snap, shape = version["snapshot"], get_shape("qwen3-vl-8b-65k")
    assert version["name"] == f"{SHAPE}/versions/v1"
    assert (snap["maxSupportedContextLength"], snap["acceleratorCount"]) == (65_536, 4)
    assert (snap["acceleratorType"], snap["nodeCount"]) == ("NVIDIA_H100_80GB", shape.nodes)
    assert snap["baseModel"] == HOSTED_8B and snap["parameterCount"] == "8770000000"
    assert snap["trainerMode"] == "POLICY_TRAINER" and snap["deploymentShapeVersion"]
    # The same shape's LoRA and forward-only twins; every account segment serves them.
    lora = _ok(cp.get(f"/v1/accounts/-/trainingShapes/qwen3-vl-8b-65k{fw.LORA_SUFFIX}/versions/v1"))
    assert lora["snapshot"]["trainerMode"] == "LORA_TRAINER"
    ref = _ok(cp.get(f"/v1/accounts/{TENANT}/trainingShapes/qwen3-vl-8b-65k-forward-only/versions"))
    assert ref["trainingShapeVersions"][0]["snapshot"]["trainerMode"] == "FORWARD_ONLY"
    missing = cp.get("/v1/accounts/fireworks/trainingShapes/nope/versions")
    assert missing.status_code == 404 and "vlmtune shapes" in missing.json()["error"]["message"]
    bad = cp.get("/v1/accounts/-/trainingShapes/-/versions", params={"filter": "color=red"})
    assert bad.status_code == 400 and "filter clause 'color=red'" in bad.json()["detail"]


def test_trainer_job_lifecycle_checkpoints_promote_and_chat(srv, key, cp):
    job_id = "training-api-service-0badc0de"
    created = _ok(_create(cp, job_id, f"{SHAPE}/versions/v1"))
    assert created["name"] == f"accounts/{TENANT}/rlorTrainerJobs/{job_id}"
    # Readable at once, and running: the client probes healthz on its first GET.
    job = _ok(cp.get(f"/v1/accounts/{TENANT}/rlorTrainerJobs/{job_id}"))
    assert (
        job["state"] == "JOB_STATE_RUNNING" and job["trainingConfig"]["maxContextLength"] == 65_536
    )
    assert job["trainingConfig"]["baseModel"] == HOSTED_8B and TIME.match(job["createTime"])
    gw = f"/training/v1/rlorTrainerJobs/{TENANT}/{job_id}"
    bearer = {"Authorization": f"Bearer {key}", "X-Api-Key": key}
    assert httpx.get(f"{srv.url}{gw}/api/v1/healthz", headers=bearer).status_code == 200
    # vlmtune's own endpoint of the job takes the client's id too.
    assert (
        httpx.get(f"{srv.url}/trainer/{job_id}/api/v1/healthz", headers=bearer).status_code == 200
    )
    again = _create(cp, job_id)
    assert again.status_code == 409 and job_id in again.json()["error"]["message"]
    # A run made through the gateway belongs to the job (the alias serves the tiny model).
    session = _ok(
        cp.post(f"{gw}/api/v1/create_session", json={"tags": [], "sdk_version": "0.23.0"})
    )
    body = {"session_id": session["session_id"], "model_seq_id": 0, "base_model": HOSTED_8B,
            "lora_config": {"rank": 0, "train_mlp": True}}  # fmt: skip
    run = _result(cp, gw, cp.post(f"{gw}/api/v1/create_model", json=body))["model_id"]
    assert srv.context.store.run(run)["job_id"] == job_id
    ids = {"model_id": run}
    _result(cp, gw, cp.post(f"{gw}/api/v1/save_weights", json={**ids, "path": "step-1"}))
    saved = {**ids, "path": "final-1a2b3c4d", "checkpoint_type": "base"}
    _result(cp, gw, cp.post(f"{gw}/api/v1/save_weights_for_sampler", json=saved))
    # Listed as soon as the futures resolved, oldest first, one per page when asked.
    listing = f"/v1/accounts/{TENANT}/rlorTrainerJobs/{job_id}/checkpoints"
    first = _ok(cp.get(listing, params={"pageSize": 1}))
    second = _ok(cp.get(listing, params={"pageSize": 1, "pageToken": first["nextPageToken"]}))
    rows = first["checkpoints"] + second["checkpoints"]
    assert second["nextPageToken"] == "" and len(rows) == 2
    assert [r["name"].rsplit("/", 1)[-1] for r in rows] == ["step-1", "final-1a2b3c4d"]
    assert [(r["checkpointType"], r["promotable"]) for r in rows] == [
        ("CHECKPOINT_TYPE_TRAINING", False), ("CHECKPOINT_TYPE_INFERENCE_BASE", True)
    ]  # fmt: skip
    assert all(TIME.match(r["createTime"]) and r["updateTime"] for r in rows)
    # Cancel stops the endpoint (healthz no longer 200); resume brings it back.
    cancelled = _ok(cp.post(f"/v1/accounts/{TENANT}/rlorTrainerJobs/{job_id}:cancel"))
    assert cancelled["state"] == "JOB_STATE_CANCELLED" and run not in srv.context.runs.runs
    assert httpx.get(f"{srv.url}{gw}/api/v1/healthz", headers=bearer).status_code == 404
    resumed = _ok(cp.post(f"/v1/accounts/{TENANT}/rlorTrainerJobs/{job_id}%3Aresume"))
    assert resumed["state"] == "JOB_STATE_RUNNING"
    assert httpx.get(f"{srv.url}{gw}/api/v1/healthz", headers=bearer).status_code == 200
    # Deleted: the tombstone stays readable, the checkpoints stay listed and promotable.
    deleted = _ok(cp.delete(f"/v1/accounts/{TENANT}/rlorTrainerJobs/{job_id}"))
    assert deleted["state"] == "JOB_STATE_DELETED"
    assert len(_ok(cp.get(listing))["checkpoints"]) == 2
    promote = {"output_model": f"accounts/{TENANT}/models/fw-control-model",
               "trainer_job_id": f"accounts/{TENANT}/rlorTrainerJobs/{job_id}",
               "base_model": HOSTED_8B, "async_promotion": True}  # fmt: skip
    url = f"/v1/accounts/{TENANT}/checkpoints/final-1a2b3c4d%3Apromote"
    model = _ok(cp.post(url, json=promote))["model"]
    assert model["name"] == promote["output_model"] and model["state"] == "READY"
    assert model["kind"] == "HF_BASE_MODEL"
    assert _ok(cp.get(f"/v1/{model['name']}"))["name"] == model["name"]
    taken = cp.post(url.replace("%3A", ":"), json=promote)
    assert taken.status_code == 400 and "already exists" in taken.json()["detail"]
    # The promoted model's resource name works in chat, with an image.
    content = [{"type": "image_url", "image_url": {"url": png_data_url(48, 48)}},
               {"type": "text", "text": "What color is this?"}]  # fmt: skip
    chat = {"model": model["name"], "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    answer = _ok(cp.post("/v1/chat/completions", json=chat))
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


def test_job_variants_and_refusals(cp):
    # Forward-only with no shape: one is chosen for the model, its context length given.
    ref = _ok(_create(cp, "fw-reference-job", shape=None, forwardOnly=True))
    assert ref["forwardOnly"] and ref["trainingShape"].endswith("-forward-only/versions/v1")
    assert ref["trainingConfig"]["maxContextLength"] > 0
    lora = _ok(_create(cp, "fw-lora-job", shape=None, loraRank=8))
    assert lora["trainingConfig"]["loraRank"] == 8 and "-lora/" in lora["trainingShape"]
    full_on_lora_shape = _create(cp, "fw-bad-mode", f"{SHAPE}{fw.LORA_SUFFIX}/versions/v1")
    assert full_on_lora_shape.status_code == 400
    assert "loraRank" in full_on_lora_shape.json()["detail"]
    for job_id, shape, status in (("Bad_Id", SHAPE, 400), ("fw-x", "qwen3-vl-8b-65k", 400),
                                  ("fw-y", "accounts/fireworks/trainingShapes/nope", 404)):  # fmt: skip
        assert _create(cp, job_id, shape).status_code == status, job_id
    assert cp.get(f"/v1/accounts/{TENANT}/rlorTrainerJobs/fw-x").status_code == 404
    listed = _ok(cp.get(f"/v1/accounts/{TENANT}/rlorTrainerJobs", params={"pageSize": 100}))
    assert {"fw-reference-job", "fw-lora-job"} <= {
        j["name"].rsplit("/", 1)[-1] for j in listed["rlorTrainerJobs"]
    }
    base = _ok(cp.get(f"/v1/{HOSTED_8B}"))
    assert base["baseModelDetails"]["moe"] is False and base["kind"] == "HF_BASE_MODEL"
    assert cp.get("/v1/accounts/fireworks/models/no-such-model").status_code == 404
    assert cp.get("/v1/accounts/someone-else/rlorTrainerJobs/fw-lora-job").status_code == 404


def test_another_account_is_unknown_and_a_gateway_of_a_stopped_job_is_closed(srv, cp):
    other = create_key(srv.context.store, "fw", tenant="fw-other")
    _ok(_create(cp, "fw-private-job"))
    gw = f"/training/v1/rlorTrainerJobs/{TENANT}/fw-private-job/api/v1/healthz"
    with httpx.Client(base_url=srv.url, headers={"X-Api-Key": other}, timeout=60) as b:
        mine = b.get("/v1/accounts/fw-other/rlorTrainerJobs/fw-private-job")
        theirs = b.get(f"/v1/accounts/{TENANT}/rlorTrainerJobs/fw-private-job")
        assert (mine.status_code, theirs.status_code, b.get(gw).status_code) == (404, 404, 404)
        assert _ok(b.get("/v1/accounts"))["accounts"][0]["name"] == "accounts/fw-other"
    assert httpx.get(f"{srv.url}{gw}", headers={"X-Api-Key": "fw_0000_nope"}).status_code == 401
