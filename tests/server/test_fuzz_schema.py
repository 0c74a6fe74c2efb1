"""Every route is in the OpenAPI schema with its body, and no input breaks the server.

schemathesis reads the live server's ``/openapi.json`` and sends each operation a
bounded, seeded set of generated requests (valid and invalid), authenticated, over
real HTTP: a 5xx, a dropped connection or an answer the schema does not describe
fails the test.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI, Request
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from vlmtune.sdk import ServiceClient
from vlmtune.server import ServerThread
from vlmtune.server.auth import create_key

MODEL = "tiny-qwen3-vl"
MANY = 25  # examples per operation (positive and negative together)
# Operations that load or run a model get fewer: an accepted request queues real work.
FEW = 10
_MODEL_OPS = ("forward", "asample", "sample", "create_model", "load_weights", "save_weights")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    # Its own server: fuzzing leaves junk sessions and jobs behind. No job processes
    # (max_concurrent_jobs=0): a TOML job the fuzzer gets accepted stays queued.
    # A short poll: retrieve_future holds a pending request that long, and the fuzzer's
    # budget is for inputs, not for waiting.
    srv = ServerThread(
        tmp_path_factory.mktemp("fuzz-server"), max_concurrent_jobs=0, poll_timeout_s=0.5
    ).start()
    key = create_key(srv.context.store, "fuzz")
    yield srv, key
    srv.stop()


@pytest.fixture(scope="module")
def known_ids(fuzz_server) -> dict[str, str]:
    """Ids that exist (a session, a LoRA run, a trainer job): random ids only ever reach
    the 404 at the top of a handler, these reach the checks behind it."""
    srv, key = fuzz_server
    tc = ServiceClient(base_url=srv.url, api_key=key).create_lora_training_client(MODEL, rank=4)
    with httpx.Client(base_url=srv.url, headers={"X-API-Key": key}, timeout=60) as http:
        session = http.post("/api/v1/create_session", json={}).json()["session_id"]
        job = http.post("/v1/jobs/trainer", json={"base_model": MODEL, "lora_rank": 4}).json()
        # A deployment of the key's account ("default"), attached to the job.
        deployment = {
            "baseModel": MODEL,
            "hotLoadTrainerJob": f"accounts/default/rlorTrainerJobs/{job['id']}",
        }
        http.post(
            "/v1/accounts/default/deployments", params={"deploymentId": "fuzz-dep"}, json=deployment
        ).raise_for_status()
    return {"model_id": tc.model_id, "run_id": tc.model_id, "session_id": session,
            "job_id": job["id"], "account": "default", "deployment_id": "fuzz-dep"}  # fmt: skip


# Operations whose success would take the known objects away from the rest of the run.
_KEEP_IDS_AWAY = {("POST", "/api/v1/unload_model"), ("DELETE", "/v1/jobs/{job_id}"),
                  ("POST", "/v1/jobs/{job_id}/cancel"),
                  ("DELETE", "/v1/accounts/{account}/deployments/{deployment_id}"),
                  ("DELETE", "/v1/accounts/{account}/rlorTrainerJobs/{job_id}"),
                  ("POST", "/v1/accounts/{account}/rlorTrainerJobs/{job_id}:cancel")}  # fmt: skip


def _prepared(case: schemathesis.Case, known: dict[str, str] | None) -> schemathesis.Case:
    """``case`` with a short events ``wait`` and, given ``known``, ids that exist."""
    if isinstance(case.query, dict) and isinstance(case.query.get("wait"), int | float):
        # Held open for up to 30 s by design (test_edge_inputs checks that bound).
        case.query["wait"] = min(case.query["wait"], 0.2)
    if known is None or (case.method.upper(), case.path) in _KEEP_IDS_AWAY:
        return case
    if isinstance(case.body, dict):
        for name in ("model_id", "session_id"):
            if name in case.body:
                case.body[name] = known[name]
    for name in list(case.path_parameters or {}):
        if name in known:
            case.path_parameters[name] = known[name]
    return case


def _fastapi(server: ServerThread) -> FastAPI:
    app: Any = server.app
    while not isinstance(app, FastAPI):
        app = app.app
    return app


def _served(api: FastAPI) -> list[tuple[str, set[str], Any]]:
    """(path, methods, endpoint) of every route the app serves, included routers too."""
    try:  # FastAPI >= 0.16x keeps included routers as branches of app.routes
        from fastapi.routing import iter_route_contexts

        routes: Any = iter_route_contexts(api.routes)
    except ImportError:
        routes = api.routes
    return [(r.path, set(r.methods or ()), r.endpoint) for r in routes if r.methods]


# How a handler reads its body (wire models through body_of / parse_body, or raw).
_BODY_READERS = ("body_of(", "parse_body(", "request.body()", "request.stream()", "request.form()")
_COMPONENTS = "#/components/schemas/"


def test_every_route_is_in_the_schema_with_its_body(fuzz_server):
    srv, key = fuzz_server
    api = _fastapi(srv)
    schema = httpx.get(f"{srv.url}/openapi.json", headers={"X-API-Key": key}).json()
    paths = schema["paths"]
    served = [(p, m, e) for p, m, e in _served(api) if p not in ("/openapi.json",)]
    assert len(served) > 30
    for path, methods, endpoint in served:
        assert path in paths, f"{path} is served but not in /openapi.json"
        for method in methods - {"HEAD"}:
            operation = paths[path].get(method.lower())
            assert operation is not None, f"{method} {path} missing from /openapi.json"
            source = inspect.getsource(endpoint)
            if any(reader in source for reader in _BODY_READERS):
                body = operation.get("requestBody")
                assert body, f"{method} {path} reads a body but declares none"
                assert all(media["schema"] for media in body["content"].values())
                if "application/json" in body["content"]:
                    ref = body["content"]["application/json"]["schema"]["$ref"]
                    assert ref.removeprefix(_COMPONENTS) in schema["components"]["schemas"]
            declared = {p["name"] for p in operation.get("parameters", [])}
            for name, param in inspect.signature(endpoint).parameters.items():
                if param.annotation not in ("Request", Request):  # path and query parameters
                    assert name in declared, f"{method} {path}: parameter {name} undeclared"
            assert {"400", "401", "404"} <= set(operation["responses"]), f"{method} {path}"
            assert "422" not in operation["responses"]  # validation errors are 400s here
    # No dangling reference: every $ref names a component.
    for name in str(schema).split(_COMPONENTS)[1:]:
        assert name.split("'")[0] in schema["components"]["schemas"]


def test_no_input_gets_a_server_error(fuzz_server, known_ids):
    srv, key = fuzz_server
    auth = {"Authorization": f"Bearer {key}"}
    config = schemathesis.Config.from_dict({"headers": auth, "request-timeout": 30})
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json", headers=auth, config=config)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 30
    failures = []
    for operation in operations:
        examples = FEW if operation.path.rsplit("/", 1)[-1].startswith(_MODEL_OPS) else MANY
        generated = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )
        # Half the cases get ids that exist, so they reach past the 404.
        strategy = st.tuples(generated, st.booleans()).map(
            lambda drawn: _prepared(drawn[0], known_ids if drawn[1] else None)
        )

        @given(case=strategy)
        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],  # schemathesis prints a curl repro
        )
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=auth, checks=checks)

        try:
            fuzz()
        except Exception as e:  # every operation's failure, not only the first
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert not failures, "\n\n".join(failures)
