"""Deployment sampling as the Fireworks SDK's RL loops drive it.

The request shapes are the recorded ones (/tmp/h6work/cap_rl_head.jsonl,
cap_managed130.jsonl, cap_rl_old.jsonl in the issue's research): a deployment attached to
a trainer job, a hot-load of a sampler checkpoint the trainer saved (a ``tinker://``
path, or a bare name as the old cookbook sends), a streamed token-in completion with an
image, a reattach that rolls the pod, scale to zero, delete. What is sampled is checked
against the trainer's own forward pass: the completion's logprobs are those of the
hot-loaded weights, over the prompt with the image expanded as in training.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from vlmtune.models.tiny import tiny_model_dir
from vlmtune.server import ServerThread
from vlmtune.server.auth import create_key

HOSTED = "accounts/fireworks/models/qwen3-vl-8b-instruct"
TINY = "tiny-qwen3-vl"
ACCOUNT = "default"  # the tenant of a key made without one
IMAGE_PAD, VISION_START, IM_END, ENDOFTEXT = 151655, 151652, 151645, 151643
# What the cookbook's Qwen3-VL renderer sends: one <|image_pad|> per image (the capture's
# 16 ids start [151644, 402, 198, 151652] and end [429, 198]).
CHAT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is this?"
    "<|im_end|>\n<|im_start|>assistant\n"
)


def _jpeg_url(seed: int = 0, size: int = 64) -> tuple[str, bytes]:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode(), data


@dataclass
class World:
    http: httpx.Client
    server: ServerThread
    job: str  # a trainer job with one full-parameter run
    run: str
    step0: str  # tinker:// path of a sampler checkpoint saved before training
    other_job: str


def _ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


def _result(http: httpx.Client, r: httpx.Response) -> dict[str, Any]:
    rid = _ok(r)["request_id"]
    while True:
        out = _ok(http.post("/api/v1/retrieve_future", json={"request_id": rid}))
        if out.get("type") != "try_again":
            assert "error" not in out, out
            return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    srv = ServerThread(
        tmp_path_factory.mktemp("deployments"), model_aliases={HOSTED.lower(): TINY}
    ).start()
    key = create_key(srv.context.store, "deployments")
    # The SDK sends the key both ways on hot-load and inference calls.
    headers = {"X-Api-Key": key, "Authorization": f"Bearer {key}"}
    http = httpx.Client(base_url=srv.url, headers=headers, timeout=120)
    job = _ok(http.post("/v1/jobs/trainer", json={"base_model": TINY, "lora_rank": 0}))["id"]
    other = _ok(http.post("/v1/jobs/trainer", json={"base_model": TINY, "lora_rank": 0}))["id"]
    gw = f"/trainer/{job}/api/v1"
    session = _ok(http.post(f"{gw}/create_session", json={"tags": [], "user_metadata": {}}))
    model = {"session_id": session["session_id"], "model_seq_id": 0, "base_model": HOSTED,
             "lora_config": {"rank": 0, "train_unembed": True, "train_mlp": True,
                             "train_attn": True}}  # fmt: skip
    run = _result(http, http.post(f"{gw}/create_model", json=model))["model_id"]
    save = {"model_id": run, "path": "step-0-b2606fc1", "checkpoint_type": "base"}
    step0 = _result(http, http.post(f"{gw}/save_weights_for_sampler", json=save))["path"]
    yield World(http, srv, job, run, step0, other)
    http.close()
    srv.stop()


def _deployment_body(world: World, job: str | None = None) -> dict[str, Any]:
    """The HEAD cookbook's create body (cap_rl_head.jsonl)."""
    return {
        "baseModel": HOSTED,
        "description": "Fireworks training deployment",
        "minReplicaCount": 1,
        "maxReplicaCount": 1,
        "enableHotLoad": True,
        "forTraining": True,
        "hotLoadBucketType": "FW_HOSTED",
        "hotLoadTrainerJob": f"accounts/{ACCOUNT}/rlorTrainerJobs/{job or world.job}",
        "deploymentShape": "accounts/fireworks/deploymentShapes/qwen3-vl-8b-65k/versions/v1",
        "annotations": {"fireworks-training-sdk/managed-rollout": "true"},
    }


def _create(world: World, dep: str) -> dict[str, Any]:
    url = f"/v1/accounts/{ACCOUNT}/deployments"
    return _ok(world.http.post(url, params={"deploymentId": dep}, json=_deployment_body(world)))


def _hot(world: World, dep: str) -> dict[str, str]:
    return {
        "fireworks-model": HOSTED,
        "fireworks-deployment": f"accounts/{ACCOUNT}/deployments/{dep}",
    }


def _hot_load(world: World, dep: str, identity: str, **extra: Any) -> httpx.Response:
    body = {"identity": identity, "reset_prompt_cache": True, **extra}
    return world.http.post("/hot_load/v1/models/hot_load", json=body, headers=_hot(world, dep))


def _replica(world: World, dep: str) -> dict[str, Any]:
    status = _ok(world.http.get("/hot_load/v1/models/hot_load", headers=_hot(world, dep)))
    assert len(status["replicas"]) == 1
    return status["replicas"][0]


def _stream(world: World, body: dict[str, Any]) -> dict[str, Any]:
    """The answer put together as the SDK's streaming reader does."""
    r = world.http.post("/inference/v1/completions", json={**body, "stream": True},
                        headers={"x-request-id": "1f4ec909209c47e98d0993b475cb7bdc"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    out: dict[str, Any] = {"text": "", "content": [], "finish": None, "raw": None}
    for chunk in map(json.loads, events[:-1]):
        assert chunk["id"].startswith("cmpl-") and "error" not in chunk
        for choice in chunk["choices"]:
            out["text"] += choice.get("text", "")
            out["content"] += (choice.get("logprobs") or {}).get("content", [])
            out["finish"] = choice.get("finish_reason") or out["finish"]
            out["raw"] = choice.get("raw_output") or out["raw"]
        out["usage"] = chunk.get("usage", out.get("usage"))
        out["perf"] = chunk.get("perf_metrics", out.get("perf"))
    return out


def _prompt_ids() -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir()).encode(CHAT, add_special_tokens=False)
    assert ids[:4] == [151644, 402, 198, VISION_START] and ids.count(IMAGE_PAD) == 1
    return ids


def _trainer_logprobs(world: World, prompt: list[int], image: bytes, n_pad: int,
                      completion: list[int]) -> list[float]:  # fmt: skip
    """The run's own logprobs of ``completion`` after the prompt with its image chunk."""
    at = prompt.index(IMAGE_PAD)
    full = prompt[:at] + [IMAGE_PAD] * n_pad + prompt[at + 1 :] + completion
    chunks = [
        {"type": "encoded_text", "tokens": prompt[:at]},
        {"type": "image", "data": base64.b64encode(image).decode(), "format": "jpeg",
         "expected_tokens": n_pad},
        {"type": "encoded_text", "tokens": (prompt[at + 1 :] + completion)[:-1]},
    ]  # fmt: skip
    n = len(full) - 1
    datum = {"model_input": {"chunks": chunks},
             "loss_fn_inputs": {"target_tokens": {"data": full[1:], "dtype": "int64"},
                                "weights": {"data": [1.0] * n, "dtype": "float32"}}}  # fmt: skip
    body = {"model_id": world.run,
            "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"}}  # fmt: skip
    out = _result(world.http, world.http.post(f"/trainer/{world.job}/api/v1/forward", json=body))
    logprobs = out["loss_fn_outputs"][0]["logprobs"]["data"]
    return logprobs[n - len(completion) :]


def _train_one_step(world: World) -> str:
    """One large optimizer step on the run, then a sampler save: the step-1 checkpoint."""
    gw = f"/trainer/{world.job}/api/v1"
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3, 4]}]},
             "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4, 5], "dtype": "int64"},
                                "weights": {"data": [1.0] * 4, "dtype": "float32"}}}  # fmt: skip
    fb = {
        "model_id": world.run,
        "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"},
    }
    _result(world.http, world.http.post(f"{gw}/forward_backward", json=fb))
    step = {"model_id": world.run, "adam_params": {"learning_rate": 0.05}}
    _result(world.http, world.http.post(f"{gw}/optim_step", json=step))
    save = {"model_id": world.run, "path": "step-1-b2606fc1", "checkpoint_type": "delta"}
    return _result(world.http, world.http.post(f"{gw}/save_weights_for_sampler", json=save))["path"]


# ---- the tests ----------------------------------------------------------------------------
def test_create_get_conflict_and_delete(world):
    http, url = world.http, f"/v1/accounts/{ACCOUNT}/deployments"
    assert http.get(f"{url}/vl-crud").status_code == 404  # the SDK's "none yet"
    made = _create(world, "vl-crud")
    assert made["state"] == "READY"  # in the POST's answer: no 15 s readiness polls
    assert made["name"] == f"accounts/{ACCOUNT}/deployments/vl-crud"
    assert made["hotLoadTrainerJob"] == _deployment_body(world)["hotLoadTrainerJob"]
    assert made["baseModel"] == HOSTED and made["annotations"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", made["createTime"])
    again = http.post(url, params={"deploymentId": "vl-crud"}, json=_deployment_body(world))
    assert again.status_code == 409 and "already exists" in again.json()["error"]["message"]
    assert _ok(http.get(f"{url}/vl-crud")) == made
    # Refusals name what is wrong, as 400s (never a 5xx the SDK retries for minutes).
    bad = [({"deploymentId": "Not_Valid"}, _deployment_body(world), "deploymentId"),
           ({"deploymentId": "x"}, {**_deployment_body(world), "baseModel": "no/such-model"},
            "no/such-model"),
           ({"deploymentId": "x"}, {**_deployment_body(world), "minReplicaCount": 2},
            "minReplicaCount")]  # fmt: skip
    for params, body, named in bad:
        r = http.post(url, params=params, json=body)
        assert r.status_code == 400 and named in r.json()["detail"], r.text
    # Another tenant's key reaches neither the account nor the deployment.
    other = create_key(world.server.context.store, "other", tenant="other")
    theirs = http.get(f"{url}/vl-crud", headers={"X-Api-Key": other, "Authorization": ""})
    assert theirs.status_code == 404
    assert _ok(http.delete(f"{url}/vl-crud", params={"ignoreChecks": "true", "hard": "true"})) == {}
    assert http.get(f"{url}/vl-crud").status_code == 404  # the SDK waits for this
    assert http.delete(f"{url}/vl-crud").status_code == 404


def test_hot_load_and_stream_a_completion_with_an_image(world):
    _create(world, "vl-rollout")
    before = _replica(world, "vl-rollout")
    assert before["identity"] == "vl-rollout-pod0" and before["current_snapshot_identity"] is None
    # The 1.2.9 warm-up probe (non-streamed, before any hot-load: the base model).
    probe = {"model": f"accounts/{ACCOUNT}/deployments/vl-rollout", "prompt": [1, 2],
             "max_tokens": 4, "temperature": 0.0}  # fmt: skip
    choice = _ok(world.http.post("/inference/v1/completions", json=probe))["choices"][0]
    assert 1 <= len(choice["raw_output"]["completion_token_ids"]) <= 4
    assert choice["finish_reason"] in ("stop", "length")

    assert _ok(_hot_load(world, "vl-rollout", world.step0))["replicas"]
    loaded = _replica(world, "vl-rollout")  # the first poll already matches
    assert loaded["current_snapshot_identity"] == world.step0 and loaded["readiness"] is True
    assert loaded["loading_state"] == {"stage": "done", "target_snapshot_identity": world.step0}

    url, jpeg = _jpeg_url()
    prompt = _prompt_ids()
    body = {"model": f"accounts/{ACCOUNT}/deployments/vl-rollout", "prompt": prompt, "n": 1,
            "max_tokens": 8, "temperature": 1.0, "perf_metrics_in_response": True,
            "raw_output": True, "top_p": 1.0, "top_k": 0, "logprobs": True,
            "return_token_ids": True, "images": [url], "stop": ["<|im_end|>"]}  # fmt: skip
    out = _stream(world, body)
    n_pad = _ok(world.http.post("/api/v1/image_token_count",
                                json={"model_id": world.run,
                                      "images": [{"width": 64, "height": 64}]}))["tokens"][0]  # fmt: skip
    expanded = out["raw"]["prompt_token_ids"]
    at = prompt.index(IMAGE_PAD)
    assert n_pad > 1 and expanded == prompt[:at] + [IMAGE_PAD] * n_pad + prompt[at + 1 :]
    tokens = out["raw"]["completion_token_ids"]
    assert 1 <= len(tokens) <= 8 and [c["token_id"] for c in out["content"]] == tokens
    assert out["finish"] in ("stop", "length")
    assert (out["finish"] == "stop") == (tokens[-1] in (IM_END, ENDOFTEXT))
    assert out["text"] == out["raw"]["completion"]
    assert out["usage"]["prompt_tokens"] == len(expanded)
    assert out["usage"]["completion_tokens"] == len(tokens)
    assert float(out["perf"]["server-processing-time"]) > 0
    # temperature 1, top_p 1, top_k 0 (unlimited): the sampling logprobs are the model's.
    sampled = [c["logprob"] for c in out["content"]]
    assert [c["sampling_logprob"] for c in out["content"]] == sampled
    # They are the hot-loaded weights' over the prompt as training lays it out.
    assert sampled == pytest.approx(_trainer_logprobs(world, prompt, jpeg, n_pad, tokens), abs=2e-3)

    # Train a step, save (a delta save, as rl_loop's), hot-load with the delta metadata:
    # the deployment now samples the new weights.
    greedy = {**body, "temperature": 0.0, "stream": False}
    first = _ok(world.http.post("/inference/v1/completions", json=greedy))["choices"][0]
    step1 = _train_one_step(world)
    delta = {"previous_snapshot_identity": world.step0, "compression_format": "arc_v2",
             "checksum_format": "alder32"}  # fmt: skip
    _ok(_hot_load(world, "vl-rollout", step1, incremental_snapshot_metadata=delta))
    assert _replica(world, "vl-rollout")["current_snapshot_identity"] == step1
    second = _ok(world.http.post("/inference/v1/completions", json=greedy))["choices"][0]
    tokens2 = second["raw_output"]["completion_token_ids"]
    lps2 = [c["logprob"] for c in second["logprobs"]["content"]]
    assert second["prompt_token_ids"] == expanded
    assert lps2 == pytest.approx(_trainer_logprobs(world, prompt, jpeg, n_pad, tokens2), abs=2e-3)
    lps1 = [c["logprob"] for c in first["logprobs"]["content"]]
    assert (tokens2, lps2) != (first["raw_output"]["completion_token_ids"], pytest.approx(lps1))
    # Greedy sampling is no full-distribution draw: no sampling logprob is claimed.
    assert {c["sampling_logprob"] for c in second["logprobs"]["content"]} == {None}

    # The old cookbook hot-loads by bare snapshot name, looked up in the attached job.
    _ok(_hot_load(world, "vl-rollout", "step-0-b2606fc1"))
    assert _replica(world, "vl-rollout")["current_snapshot_identity"] == "step-0-b2606fc1"
    assert _ok(world.http.post("/inference/v1/completions", json=greedy))["choices"][0] == first
    for identity, status, named in [
        ("step-9-00000000", 404, "no sampler checkpoint"),
        (world.step0.replace("sampler_weights", "weights"), 400, "training state"),
    ]:
        r = _hot_load(world, "vl-rollout", identity)
        assert r.status_code == status and named in r.json()["detail"], r.text
    missing = world.http.get("/hot_load/v1/models/hot_load")
    assert missing.status_code == 400 and "fireworks-deployment" in missing.json()["detail"]


def test_reattach_rolls_the_pod_and_scale_to_zero_unloads(world):
    http, dep = world.http, f"/v1/accounts/{ACCOUNT}/deployments/vl-reattach"
    _create(world, "vl-reattach")
    _ok(_hot_load(world, "vl-reattach", world.step0))
    pod = _replica(world, "vl-reattach")["identity"]
    # 1.2.30's reattach (cap_managed130.jsonl): a masked PATCH naming the new trainer.
    new_job = f"accounts/{ACCOUNT}/rlorTrainerJobs/{world.other_job}"
    patched = _ok(http.patch(dep, params={"updateMask": "hot_load_trainer_job"},
                             json={"hotLoadTrainerJob": new_job}))  # fmt: skip
    assert patched["hotLoadTrainerJob"] == new_job and patched["state"] == "READY"
    assert patched["description"] == "Fireworks training deployment"  # untouched
    replica = _replica(world, "vl-reattach")
    assert replica["identity"] != pod  # 1.2.9 waits for exactly this
    assert replica["current_snapshot_identity"] is None  # a new pod has nothing loaded
    # The old job's checkpoints are still the tenant's to load by path.
    _ok(_hot_load(world, "vl-reattach", world.step0))
    # Scale to zero, as both SDKs send it: no updateMask.
    zero = _ok(http.patch(dep, json={"maxReplicaCount": 0, "minReplicaCount": 0}))
    assert (zero["minReplicaCount"], zero["maxReplicaCount"]) == (0, 0)
    assert zero["hotLoadTrainerJob"] == new_job
    pool = world.server.context.pool
    loaded_path = world.server.context.store.deployment(ACCOUNT, "vl-reattach")["loaded_path"]
    assert loaded_path not in pool.loaded()  # its memory went back
    probe = {"model": f"accounts/{ACCOUNT}/deployments/vl-reattach", "prompt": "Hello",
             "max_tokens": 2, "temperature": 0.0}  # fmt: skip
    assert _ok(http.post("/inference/v1/completions", json=probe))["choices"]  # loads again
    for params, body, named in [
        ({"updateMask": "base_model"}, {"baseModel": TINY}, "base_model"),
        ({}, {"baseModel": TINY}, "baseModel"),
        ({}, {"minReplicaCount": 3}, "minReplicaCount"),
    ]:
        r = http.patch(dep, params=params, json=body)
        assert r.status_code == 400 and named in r.json()["detail"], r.text


def test_completion_inputs_are_checked(world):
    _create(world, "vl-inputs")
    model = f"accounts/{ACCOUNT}/deployments/vl-inputs"
    url, _ = _jpeg_url(1)
    two = {"model": model, "prompt": [151644, 402, 198], "max_tokens": 3, "n": 2,
           "logprobs": True, "stop": "<|im_end|>", "top_k": 5, "seed": 7}  # fmt: skip
    out = _ok(world.http.post("/inference/v1/completions", json=two))
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert all(len(c["logprobs"]["content"]) == len(c["raw_output"]["completion_token_ids"])
               for c in out["choices"])  # fmt: skip
    # The SDK's n completions are n requests of n=1: unseeded, each is its own draw; a
    # seed repeats one.
    one = {**two, "n": 1, "top_k": 0, "max_tokens": 8}  # the random model's flat draw
    draws = [
        _ok(world.http.post("/inference/v1/completions", json={**one, "seed": seed}))
        for seed in (None, None, 7, 7)
    ]
    tokens = [d["choices"][0]["raw_output"]["completion_token_ids"] for d in draws]
    assert tokens[0] != tokens[1] and tokens[2] == tokens[3]
    cases = [
        ({"prompt": [1, IMAGE_PAD, 2]}, 400, "1 <|image_pad|>"),  # a pad, no image
        ({"prompt": [1, 2], "images": [url]}, 400, "0 <|image_pad|>"),
        ({"prompt": [1, IMAGE_PAD], "images": ["https://example.com/x.png"]}, 400, "data URL"),
        ({"prompt": [1, 2], "echo": True}, 400, "echo"),
        ({"prompt": [1, 2], "model": f"accounts/{ACCOUNT}/deployments/nope"}, 404, "nope"),
        ({"prompt": [1, 2], "model": "tiny-qwen3-vl"}, 400, "accounts/<a>/deployments/<id>"),
        ({"prompt": [1, 2], "model": "accounts/other/deployments/vl-inputs"}, 404, "account"),
        ({"prompt": [1, 2], "top_k": -2}, 400, "top_k"),
    ]
    for change, status, named in cases:
        r = world.http.post("/inference/v1/completions", json={**two, **change})
        assert r.status_code == status and named in r.json()["detail"], (change, r.text)


def test_deployment_shapes_of_the_training_shapes(world):
    url = "/v1/accounts/fireworks/deploymentShapes/qwen3-vl-8b-65k/versions"
    version = _ok(world.http.get(f"{url}/v1"))  # the old cookbook's read
    assert version["name"] == url.removeprefix("/v1/") + "/v1"
    assert version["snapshot"] == {"acceleratorType": "NVIDIA_H100_80GB", "acceleratorCount": 1}
    listed = _ok(world.http.get(url, params={"filter": "latest_validated=true", "pageSize": 1}))
    assert listed["deploymentShapeVersions"] == [version]
    assert (
        world.http.get(url.replace("qwen3-vl-8b-65k", "no-such-shape") + "/v1").status_code == 404
    )


def test_streamed_text_holds_back_partial_characters():
    from transformers import AutoTokenizer

    from vlmtune.server.completions import token_pieces

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    ids = tokenizer.encode("Hello wörld 🙂 done<|im_end|>", add_special_tokens=False)
    pieces = token_pieces(lambda t: tokenizer.decode(t, skip_special_tokens=True), ids)
    assert len(pieces) == len(ids)  # one per token: the stream pairs each with its logprob
    assert "".join(pieces) == "Hello wörld 🙂 done"
    assert "🙂" in pieces and "\ufffd" not in "".join(pieces)  # no half characters sent
    assert pieces[-1] == ""  # <|im_end|> adds no text
