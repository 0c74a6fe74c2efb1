"""Bad input gets a 4xx with a reason, never a 500, and never changes a run's state."""

from __future__ import annotations

import base64
import time

import httpx
import pytest
import torch

from tests.conftest import assistant, image_part, user
from tests.server.conftest import b64_png
from vlmtune.protocol.wire import WireDatum
from vlmtune.sdk import AdamParams, ServiceClient
from vlmtune.server import ServerThread

MODEL = "tiny-qwen3-vl"


@pytest.fixture(scope="module")
def tc(server, key):
    return ServiceClient(base_url=server.url, api_key=key).create_lora_training_client(
        MODEL, rank=4
    )


@pytest.fixture(scope="module")
def good(tc):
    datum = tc.datum_from_messages([user(image_part(32, 32), "What is it?"), assistant("a cat")])
    return WireDatum.of(datum).model_dump(exclude_none=True)


def fb_body(tc, data, **extra):
    return {
        "model_id": tc.model_id,
        "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"},
        **extra,
    }


def test_keys_are_required_and_checked(server, key, api):
    assert httpx.get(f"{server.url}/api/v1/healthz").json() == {"status": "ok"}
    sessions = server.context.store.session_count()
    for headers in ({}, {"X-API-Key": "tml-0000aaaa_nope"}, {"Authorization": "Bearer abc"},
                    {"Authorization": f"Bearer {key}x"}):  # fmt: skip
        r = httpx.post(f"{server.url}/api/v1/create_session", json={}, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert server.context.store.session_count() == sessions
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
        assert (
            httpx.post(f"{server.url}/api/v1/create_session", json={}, headers=headers).status_code
            == 200
        )
    row = server.context.store.api_key(key.removeprefix("tml-").split("_")[0])
    assert row is not None
    assert key.encode() not in row["digest"] and key not in str(row)


def test_malformed_requests_get_4xx_and_leave_the_run_alone(tc, good, api):
    step = tc.get_info()["step"]
    image_at = next(i for i, c in enumerate(good["model_input"]["chunks"]) if c["type"] == "image")

    def with_chunk(**changes):
        chunks = [dict(c) for c in good["model_input"]["chunks"]]
        chunks[image_at].update(changes)
        return [{**good, "model_input": {"chunks": chunks}}]

    target = good["loss_fn_inputs"]["target_tokens"]
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (fb_body(tc, [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": "abc"}]}}]), 400, "tokens"),
        (fb_body(tc, [good]) | {"model_id": "sess-x:train:0"}, 404, "unknown model id"),
        ({**fb_body(tc, [good]), "forward_backward_input": {"data": [good], "loss_fn": "dpo"}}, 400, "unknown loss_fn"),
        (fb_body(tc, [{**good, "loss_fn_inputs": {"target_tokens": {**target, "data": target["data"][:-1], "shape": None}}}]), 400, "values for"),
        (fb_body(tc, [{**good, "loss_fn_inputs": {"target_tokens": {**target, "data": [10**7] * len(target["data"])}}}]), 400, "[0, "),
        (fb_body(tc, with_chunk(data=base64.b64encode(b"not an image").decode())), 400, "does not decode"),
        (fb_body(tc, with_chunk(data="***")), 400, "base64"),
        (fb_body(tc, with_chunk(expected_tokens=9)), 400, "expects 9 tokens but the processor makes 4"),
        (fb_body(tc, []), 400, "data"),
    ]  # fmt: skip
    for body, status, needle in cases:
        r = (
            api.post("/api/v1/forward_backward", content=body)
            if isinstance(body, bytes)
            else api.post("/api/v1/forward_backward", json=body)
        )
        assert r.status_code == status, (needle, r.text)
        assert needle in r.json()["detail"], (needle, r.text)
    other = [
        ("/api/v1/optim_step", {"model_id": tc.model_id, "adam_params": {"learning_rate": -1}}, 400),
        ("/api/v1/optim_step", {"model_id": tc.model_id, "adam_params": {"beta1": "x"}}, 400),
        ("/api/v1/save_weights", {"model_id": tc.model_id, "path": "../escape"}, 400),
        ("/api/v1/load_weights", {"model_id": tc.model_id, "path": "tinker://nope/weights/x", "optimizer": True}, 404),
        ("/api/v1/retrieve_future", {"request_id": "req-unknown"}, 404),
        ("/api/v1/get_info", {"model_id": "nope"}, 404),
        ("/api/v1/asample", {"sampling_session_id": "samp-nope", "prompt": {"chunks": []}}, 404),
        ("/api/v1/no_such_endpoint", {}, 404),
    ]  # fmt: skip
    for path, body, status in other:
        r = api.post(path, json=body)
        assert r.status_code == status, (path, r.text)
        assert r.json()["detail"]
    assert tc.get_info()["step"] == step
    # A rejected numbered request does not hold up the next one (no gap timeout).
    r = api.post(
        "/api/v1/optim_step", json={"model_id": tc.model_id, "seq_id": 1, "adam_params": {"eps": 0}}
    )
    assert r.status_code == 400
    t0 = time.monotonic()
    rid = api.post("/api/v1/forward_backward", json=fb_body(tc, [good], seq_id=2)).json()[
        "request_id"
    ]
    out = api.post("/api/v1/retrieve_future", json={"request_id": rid}).json()
    assert "loss:sum" in out["metrics"] and time.monotonic() - t0 < 8
    # Sending the same seq_id again (a retry) returns the same future, not a second pass.
    again = api.post("/api/v1/forward_backward", json=fb_body(tc, [good], seq_id=2)).json()
    assert again["request_id"] == rid
    tc.optim_step(AdamParams(learning_rate=1e-3)).result()
    assert tc.get_info()["step"] == step + 1


def test_engine_failure_restores_gradients(server, tc, good, api):
    run = server.context.runs.get(tc.model_id)
    tc.forward_backward([tc.datum_from_messages([user("hi"), assistant("there")])]).result()
    before = [None if p.grad is None else p.grad.clone() for p in run.engine.trainable_params]
    original = run.engine.forward_backward

    def fails_midway(*args, **kwargs):
        original(*args, **kwargs)  # gradients accumulated, then the engine fails
        raise ValueError("engine refused the batch")

    run.engine.forward_backward = fails_midway
    try:
        rid = api.post("/api/v1/forward_backward", json=fb_body(tc, [good])).json()["request_id"]
        out = api.post("/api/v1/retrieve_future", json={"request_id": rid}).json()
    finally:
        del run.engine.forward_backward
    assert out == {"error": "engine refused the batch", "category": "user"}
    after = [p.grad for p in run.engine.trainable_params]
    assert all(
        (a is None and b is None) or torch.equal(a, b) for a, b in zip(after, before, strict=True)
    )
    tc.optim_step(AdamParams(learning_rate=1e-3)).result()


def test_oversized_bodies_are_413(tmp_path):
    with ServerThread(tmp_path, max_body_mb=0.001) as small:
        from vlmtune.server.auth import create_key

        key = create_key(small.context.store)
        headers = {"Authorization": f"Bearer {key}"}
        r = httpx.post(f"{small.url}/api/v1/forward_backward", content=b"x" * 5000, headers=headers)
        assert r.status_code == 413 and "--max-body-mb" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b"y" * 1000

        r = httpx.post(f"{small.url}/api/v1/forward_backward", content=chunks(), headers=headers)
        assert r.status_code == 413
        r = httpx.post(f"{small.url}/api/v1/image_token_count", headers=headers,
                       json={"base_model": MODEL, "images": [{"data": b64_png(8, 8)}]})  # fmt: skip
        assert r.status_code == 200 and r.json()["tokens"] == [4]


def test_api_keys_file_plain_and_hashed_lines(tmp_path):
    from vlmtune.server.auth import hashed_line

    plain, hashed = "tml-0a0a0a0a_plainsecret", "tml-0b0b0b0b_hashedsecret"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# team keys\n{plain}\n{hashed_line(hashed)}\n")
    assert hashed not in keys.read_text()
    with ServerThread(tmp_path / "data", api_keys_file=keys) as srv:
        for key, status in ((plain, 200), (hashed, 200), ("tml-0b0b0b0b_wrong", 401)):
            r = httpx.post(f"{srv.url}/api/v1/client/config", headers={"X-API-Key": key}, json={})
            assert r.status_code == status
