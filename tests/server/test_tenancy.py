"""Tenancy: what a key makes belongs to its tenant; no other tenant sees it.

Tenant A makes one of everything (a trainer job with its run, saved state, a sampler
checkpoint, a snapshot and a path sampling session, futures, a promoted model, a TOML
job); tenant B then asks for each by every route that takes an id. B must get exactly
what an unknown id gets (a 404, never a 403 that confirms the object exists), must not
see A's objects in any list, and must change nothing. The operator sees and acts on all.

The routes are read from the app itself: a route that is neither probed
(``tenancy_probes.PROBES``), nor a list, nor named as owning nothing fails
``test_every_route_is_classified``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from tests.recipes.test_sft import write_rows
from tests.server.tenancy_probes import (
    FILE_JOB,
    LISTS,
    MODEL,
    OWNS_NOTHING,
    PROBES,
    PROMPT,
    TASKS,
    UNKNOWN,
)
from vlmtune.cli import app as cli_app
from vlmtune.server import ServerThread
from vlmtune.server.auth import Identity, KeyChecker, create_key, hashed_line
from vlmtune.server.store import Store


@dataclass
class World:
    server: ServerThread
    a: httpx.Client
    b: httpx.Client
    op: httpx.Client
    ids: dict[str, str]  # A's objects, keyed as UNKNOWN
    mine: dict[str, str]  # B's own: b_session, b_run


def _client(server: ServerThread, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()


def _result(c: httpx.Client, r: httpx.Response) -> tuple[str, dict[str, Any]]:
    """(request id, result) of a queued call."""
    rid = _ok(r)["request_id"]
    while True:
        out = _ok(c.post("/api/v1/retrieve_future", json={"request_id": rid}))
        if out.get("type") != "try_again":
            assert "error" not in out, out
            return rid, out


def _run(c: httpx.Client, prefix: str = "") -> tuple[str, str]:
    """(session id, run id) of a new LoRA run of the tiny model."""
    session = _ok(c.post(f"{prefix}/api/v1/create_session", json={}))["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": MODEL,
            "lora_config": {"rank": 4}}  # fmt: skip
    _, out = _result(c, c.post(f"{prefix}/api/v1/create_model", json=body))
    return session, out["model_id"]


@pytest.fixture(scope="module")
def world(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    store = server.context.store
    a = _client(server, create_key(store, "tenancy", tenant="tenancy-a"))
    b = _client(server, create_key(store, "tenancy", tenant="tenancy-b"))
    op = _client(server, create_key(store, "tenancy", operator=True))
    ids: dict[str, str] = {}
    ids["job"] = _ok(a.post("/v1/jobs/trainer", json={"base_model": MODEL, "lora_rank": 4}))["id"]
    ids["session"], ids["run"] = _run(a, f"/trainer/{ids['job']}")
    run = {"model_id": ids["run"]}
    ids["request"], out = _result(a, a.post("/api/v1/save_weights", json={**run, "path": "st"}))
    ids["state_path"] = out["path"]
    _, out = _result(a, a.post("/api/v1/save_weights_for_sampler", json={**run, "path": "samp"}))
    ids["sampler_path"] = out["path"]
    _, out = _result(a, a.post("/api/v1/save_weights_for_sampler", json=run))
    ids["snapshot"] = out["sampling_session_id"]
    ids["path_session"] = _ok(
        a.post("/api/v1/create_sampling_session", json={"model_path": ids["sampler_path"]})
    )["sampling_session_id"]
    sample = {"sampling_session_id": ids["snapshot"], "prompt": PROMPT,
              "sampling_params": {"max_tokens": 2}}  # fmt: skip
    ids["sample_request"], _ = _result(a, a.post("/api/v1/asample", json=sample))
    promote = {"checkpoint_id": ids["sampler_path"], "output_model_id": "tenancy-a-model"}
    ids["model"] = _ok(a.post(f"/v1/jobs/{ids['job']}/promote", json=promote))["id"]
    rows = tmp_path_factory.mktemp("tenancy") / "train.jsonl"
    write_rows(rows, 2)
    upload = {"file": ("train.jsonl", rows.read_bytes())}
    ids["file"] = _ok(a.post("/v1/files", files=upload))["id"]
    job = {"config_toml": FILE_JOB.format(file=ids["file"]), "type": "sft"}
    ids["toml_job"] = _ok(a.post("/v1/jobs", json=job))["id"]
    # The operator acts on A's job: it need not run for this test.
    assert _ok(op.post(f"/v1/jobs/{ids['toml_job']}/cancel", json={}))["state"] == "cancelled"
    # A deployment of A's, attached to A's job, with A's sampler checkpoint loaded; B has
    # its own (B's hot-load of A's checkpoint onto it must fail).
    ids["account"], ids["deployment"] = "tenancy-a", "tenancy-dep"
    deployment = {
        "baseModel": MODEL,
        "hotLoadTrainerJob": f"accounts/tenancy-a/rlorTrainerJobs/{ids['job']}",
    }
    _ok(
        a.post(
            "/v1/accounts/tenancy-a/deployments",
            params={"deploymentId": "tenancy-dep"},
            json=deployment,
        )
    )
    hot = {"fireworks-deployment": "accounts/tenancy-a/deployments/tenancy-dep"}
    _ok(a.post("/hot_load/v1/models/hot_load", json={"identity": "samp"}, headers=hot))
    for task in TASKS:
        ids[f"{task}_episode"] = _ok(a.post(f"/tasks/{task}/episodes", json={"seed": 0}))[
            "episode_id"
        ]
    mine = dict(zip(("b_session", "b_run"), _run(b), strict=True))
    mine.update(b_account="tenancy-b", b_deployment="b-dep")
    _ok(
        b.post(
            "/v1/accounts/tenancy-b/deployments",
            params={"deploymentId": "b-dep"},
            json={"baseModel": MODEL},
        )
    )
    yield World(server, a, b, op, ids, mine)
    for c in (a, b, op):
        c.close()


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format_map(ids)
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    return value


def _send(
    c: httpx.Client, method: str, url: str, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    if body is not None:
        return c.request(method, url, json=body, headers=headers)
    return c.request(method, url, headers=headers)


def _detail(r: httpx.Response, ids: dict[str, str]) -> str:
    """The answer with every id named by its role, so two answers compare by shape."""
    text = r.text
    for name, value in sorted(ids.items(), key=lambda kv: -len(kv[1])):
        text = text.replace(value, f"<{name}>")
    return text


def _api(server: ServerThread) -> FastAPI:
    app: Any = server.app
    while not isinstance(app, FastAPI):
        app = app.app
    return app


def _flat(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route; newer FastAPI keeps an included router whole."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _flat(included.routes, prefix + route.include_context.prefix)
        else:
            for method in getattr(route, "methods", None) or ():
                if method != "HEAD":
                    yield method, prefix + route.path


def test_every_route_is_classified(server):
    routes = set(_flat(_api(server).routes))
    classified = set(PROBES) | LISTS | set(OWNS_NOTHING)
    assert not set(PROBES) & set(OWNS_NOTHING) and not LISTS & set(PROBES)
    assert routes - classified == set(), "new routes: add a tenancy probe (or say why not)"
    assert classified - routes == set(), "routes that no longer exist"


def test_another_tenant_gets_what_an_unknown_id_gets(world):
    c = world.server.context
    steps_before = c.runs.step(c.runs.get(world.ids["run"]))
    for (method, route), probes in PROBES.items():
        for verb, url, body, status, *headers in probes:
            real = {**world.ids, **world.mine}
            fake = {**UNKNOWN, **world.mine}
            head = headers[0] if headers else None
            theirs = _send(world.b, verb, _fill(url, real), _fill(body, real), _fill(head, real))
            unknown = _send(world.b, verb, _fill(url, fake), _fill(body, fake), _fill(head, fake))
            where = f"{method} {route}: {verb} {_fill(url, real)} {body}"
            assert theirs.status_code == unknown.status_code == status, (where, theirs.text)
            shown = _detail(theirs, real)
            assert shown == _detail(unknown, fake), where
            assert "tenan" not in shown.lower() and "forbidden" not in shown.lower(), where
    # B changed nothing of A's: the run is loaded and untrained, the session active, the
    # job running, the future not cancelled, nothing saved or promoted.
    assert world.ids["run"] in c.runs.runs
    assert c.runs.step(c.runs.get(world.ids["run"])) == steps_before
    assert c.store.session(world.ids["session"])["status"] == "active"
    assert c.store.job(world.ids["job"])["state"] == "running"
    assert c.store.job(world.ids["toml_job"])["state"] == "cancelled"
    assert c.store.checkpoint(world.ids["run"], "training", "b-was-here") is None
    assert c.store.model("tenancy-b-steal") is None
    assert c.store.file(world.ids["file"]) is not None
    deployment = c.store.deployment("tenancy-a", world.ids["deployment"])
    assert deployment["loaded_identity"] == "samp" and deployment["generation"] == 0
    assert (
        deployment["config"]["maxReplicaCount"] == 1
        and c.store.deployment("tenancy-b", "b-dep2") is None
    )
    retrieved = world.a.post("/api/v1/retrieve_future", json={"request_id": world.ids["request"]})
    assert _ok(retrieved)["path"] == world.ids["state_path"]
    ckpts = _ok(world.a.get(f"/api/v1/training_runs/{world.ids['run']}/checkpoints"))
    assert {x["tinker_path"] for x in ckpts["checkpoints"]} == {
        world.ids["state_path"],
        world.ids["sampler_path"],
    }


def test_lists_show_only_own_objects(world):
    a_ids, b_run = set(world.ids.values()), world.mine["b_run"]

    def listed(c: httpx.Client) -> set[str]:
        runs = _ok(c.get("/api/v1/training_runs", params={"limit": 100}))
        jobs = _ok(c.get("/v1/jobs"))["jobs"]
        models = _ok(c.get("/v1/models"))["data"]
        files = _ok(c.get("/v1/files"))["data"]
        return (
            {r["training_run_id"] for r in runs["training_runs"]}
            | {j["id"] for j in jobs}
            | {f["id"] for f in files}
            | {m["id"] for m in models if m["vlmtune"]["kind"] == "promoted"}
        )

    own = {world.ids[k] for k in ("run", "job", "toml_job", "model", "file")}
    assert listed(world.a) & (own | {b_run}) == own
    assert listed(world.b) & (own | {b_run}) == {b_run}
    assert listed(world.op) >= own | {b_run}
    runs = _ok(world.b.get("/api/v1/training_runs"))
    assert runs["cursor"]["total_count"] == 1 and not a_ids & {
        r["training_run_id"] for r in runs["training_runs"]
    }


def test_the_operator_sees_and_acts_on_every_tenant(world):
    ids, op = world.ids, world.op
    assert _ok(op.post("/api/v1/get_info", json={"model_id": ids["run"]}))["model_id"] == ids["run"]
    assert _ok(op.get(f"/api/v1/training_runs/{world.mine['b_run']}"))["base_model"] == MODEL
    assert _ok(op.get(f"/api/v1/samplers/{ids['snapshot']}"))["sampler_id"] == ids["snapshot"]
    assert _ok(op.get(f"/v1/jobs/{ids['toml_job']}"))["state"] == "cancelled"
    assert _ok(op.get(f"/v1/jobs/{ids['job']}/events"))["events"]
    deployment = _ok(op.get("/v1/accounts/tenancy-a/deployments/tenancy-dep"))
    assert deployment["hotLoadTrainerJob"].endswith(ids["job"])
    sample = {"model_path": ids["sampler_path"], "prompt": PROMPT,
              "sampling_params": {"max_tokens": 2}}  # fmt: skip
    _, out = _result(op, op.post("/api/v1/asample", json=sample))
    assert out["sequences"]
    # An operator's promotion of A's checkpoint is A's model: A lists it, B cannot use it.
    promote = {"checkpoint_id": ids["sampler_path"], "output_model_id": "tenancy-op-model"}
    _ok(op.post(f"/v1/jobs/{ids['job']}/promote", json=promote))
    assert "tenancy-op-model" in {m["id"] for m in _ok(world.a.get("/v1/models"))["data"]}
    chat = {"model": "tenancy-op-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2}  # fmt: skip
    assert world.b.post("/v1/chat/completions", json=chat).status_code == 404
    assert _ok(op.post("/v1/chat/completions", json=chat))["choices"]


def test_keys_file_lines_name_tenants_and_operators(tmp_path):
    keys = ["tml-0a0a0a0a_plain", "tml-0b0b0b0b_team", "tml-0c0c0c0c_hashed", "tml-0d0d0d0d_op"]
    path = tmp_path / "keys.txt"
    path.write_text(
        f"{keys[0]}\nteam-b:{keys[1]}\n{hashed_line(keys[2], 'team-c')}\n"
        f"{hashed_line(keys[3], operator=True)}\n"
    )
    store = Store(tmp_path / "server.db")
    checker = KeyChecker(store, path)
    assert [checker.identify(k) for k in keys] == [
        Identity("default"),
        Identity("team-b"),
        Identity("team-c"),
        Identity("default", operator=True),
    ]
    assert checker.identify("tml-0b0b0b0b_wrong") is None
    path.write_text("# ok\nbad tenant!:tml-0e0e0e0e_x\n")
    with pytest.raises(ValueError, match=r"keys.txt:2: tenant 'bad tenant!'"):
        KeyChecker(store, path)
    store.close()


def test_keys_cli_creates_tenant_and_operator_keys(tmp_path):
    runner = CliRunner()
    base = ["keys", "create", "--data-dir", str(tmp_path)]
    plain = runner.invoke(cli_app, base).output.strip()
    team = runner.invoke(cli_app, [*base, "--tenant", "team-a", "--label", "ci"]).output.strip()
    operator = runner.invoke(cli_app, [*base, "--operator"]).output.strip()
    store = Store(tmp_path / "server.db")
    checker = KeyChecker(store)
    assert checker.identify(plain) == Identity("default")
    assert checker.identify(team) == Identity("team-a")
    assert checker.identify(operator) == Identity("default", operator=True)
    store.close()
    listed = runner.invoke(cli_app, ["keys", "list", "--data-dir", str(tmp_path)]).output
    lines = listed.strip().splitlines()
    assert len(lines) == 3 and "operator" in lines[2] and "team-a" in lines[1]
    assert "ci" in lines[1] and "tenant" in lines[0] and "default" in lines[0]
    bad = runner.invoke(cli_app, [*base, "--tenant", "no/slash"])
    assert bad.exit_code == 2 and "--tenant" in bad.output and "Traceback" not in bad.output


def test_an_old_database_gains_tenant_columns(tmp_path):
    db = tmp_path / "server.db"
    old = sqlite3.connect(db)
    old.executescript(
        "CREATE TABLE runs (id TEXT PRIMARY KEY, session_id TEXT, job_id TEXT, "
        "base_model TEXT NOT NULL, lora_rank INTEGER NOT NULL, config TEXT NOT NULL, "
        "dir TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, "
        "last_request REAL NOT NULL, user_metadata TEXT NOT NULL DEFAULT '{}', "
        "deleted INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO runs (id, base_model, lora_rank, config, dir, created, last_request) "
        "VALUES ('r1', 'm', 4, '{}', '/x', 0, 0);"
        "CREATE TABLE api_keys (kid TEXT PRIMARY KEY, salt BLOB NOT NULL, "
        "digest BLOB NOT NULL, label TEXT, created REAL NOT NULL, "
        "revoked INTEGER NOT NULL DEFAULT 0);"
    )
    old.commit()
    old.close()
    store = Store(db)
    assert store.run("r1", tenant="default") is not None
    assert store.run("r1", tenant="other") is None
    key = create_key(store, "old")
    assert KeyChecker(store).identify(key) == Identity("default")
    store.close()
    again = Store(db)  # a migrated database opens as a new one
    assert [k["tenant"] for k in again.api_keys()] == ["default"]
    again.close()
