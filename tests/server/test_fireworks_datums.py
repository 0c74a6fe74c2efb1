"""The Tinker routes as the Fireworks training clients call them (fireworks-ai 1.2.9/1.2.30
and the cookbook): request bodies hand-built in the shapes their recorded requests had.

Covered: ``forward`` with tinker 0.23's ``forward_input``; both ``target_tokens``
layouts around image tokens giving the canonical datum's loss; the placeholder refusal
saying how to send an image; ``loss_mask``; ``grad_accumulation_normalization``;
``checkpoint_type`` base/delta/merged_base; ``base_only`` references, forward-only jobs
and ``lora_config.alpha``; resuming by bare name across a job's runs, ``cross_job://``
and ``list_checkpoints``; ``top_k: 0``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import assistant, image_part, user
from vlmtune.protocol.wire import WireDatum, WireSamplingParams
from vlmtune.render import datum_from_rendered
from vlmtune.sdk.http import local_renderer

MODEL = "tiny-qwen3-vl"
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()


def call(api: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a queued call and wait for its result (which must not be an error)."""
    rid = _ok(api.post(path, json=body))["request_id"]
    while True:
        out = _ok(api.post("/api/v1/retrieve_future", json={"request_id": rid}))
        if out.get("type") != "try_again":
            assert "error" not in out, out
            return out


def new_model(api: httpx.Client, prefix: str = "", seq: int = 0, **body: Any) -> str:
    session = _ok(api.post(f"{prefix}/api/v1/create_session", json={"tags": []}))["session_id"]
    req = {"session_id": session, "model_seq_id": seq, "base_model": MODEL, **body}
    return call(api, f"{prefix}/api/v1/create_model", req)["model_id"]


def new_job(api: httpx.Client, lora_rank: int = 4) -> str:
    return _ok(api.post("/v1/jobs/trainer", json={"base_model": MODEL, "lora_rank": lora_rank}))[
        "id"
    ]


def fb(data: list[dict], key: str = "forward_backward_input", **extra: Any) -> dict[str, Any]:
    return {key: {"data": data, "loss_fn": "cross_entropy"}, **extra}


@pytest.fixture(scope="module")
def lora(api: httpx.Client) -> str:
    return new_model(api, lora_config={"rank": 4, "seed": 0})


@pytest.fixture(scope="module")
def canonical(api: httpx.Client, lora: str) -> dict[str, Any]:
    """vlmtune's own datum for a one-image conversation, as JSON."""
    info = _ok(api.post("/api/v1/get_info", json={"model_id": lora}))["vlmtune"]
    renderer = local_renderer(MODEL, info["min_pixels"], info["max_pixels"], None)
    rendered = renderer.render(
        [user(image_part(32, 32, seed=5), "What is it?"), assistant("a cat")]
    )
    datum = datum_from_rendered(rendered, renderer.image_token_id)
    return WireDatum.of(datum).model_dump(exclude_none=True)


def image_next(datum: dict[str, Any]) -> np.ndarray:
    """Per input position: is its next token an image token?"""
    slots = []
    for c in datum["model_input"]["chunks"]:
        slots += [c["type"] == "image"] * (
            c["expected_tokens"] if c["type"] == "image" else len(c["tokens"])
        )
    return np.array(slots[1:] + [False])


def fireworks_expanded(datum: dict[str, Any]) -> dict[str, Any]:
    """The HEAD cookbook's layout: 0 (a wire placeholder) at every image-next position."""
    out = copy.deepcopy(datum)
    targets = np.array(out["loss_fn_inputs"]["target_tokens"]["data"])
    out["loss_fn_inputs"]["target_tokens"]["data"] = np.where(
        image_next(datum), 0, targets
    ).tolist()
    return out


def fireworks_text_only(datum: dict[str, Any]) -> dict[str, Any]:
    """The 68dc0d97 cookbook's layout: targets of the text-next positions only (weights
    still one per position), with the shape the client sends."""
    out = copy.deepcopy(datum)
    targets = np.array(out["loss_fn_inputs"]["target_tokens"]["data"])[~image_next(datum)]
    out["loss_fn_inputs"]["target_tokens"] = {
        "data": targets.tolist(), "dtype": "int64", "shape": [len(targets)],
    }  # fmt: skip
    return out


def test_forward_takes_tinker_023s_forward_input(api, lora, canonical):
    body = fb([canonical], key="forward_input", model_id=lora, seq_id=1)
    out = call(api, "/api/v1/forward", body)
    n = len(canonical["loss_fn_inputs"]["weights"]["data"])
    assert len(out["loss_fn_outputs"][0]["logprobs"]["data"]) == n
    assert out["metrics"]["loss:sum"] > 0


def test_both_target_token_layouts_give_the_canonical_loss(api, lora, canonical):
    n = len(canonical["loss_fn_inputs"]["weights"]["data"])
    k = int(image_next(canonical).sum())
    assert k > 0  # the datum has an image, so the layouts differ
    layouts = [canonical, fireworks_expanded(canonical), fireworks_text_only(canonical)]
    assert len(layouts[2]["loss_fn_inputs"]["target_tokens"]["data"]) == n - k
    forwards = [call(api, "/api/v1/forward", fb([d], model_id=lora)) for d in layouts]
    losses = [f["metrics"]["loss:sum"] for f in forwards]
    logprobs = [f["loss_fn_outputs"][0]["logprobs"]["data"] for f in forwards]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)
    # Every position's log-prob (a custom loss reads them all), n of them in every layout.
    for lp in logprobs[1:]:
        assert len(lp) == n and np.allclose(lp, logprobs[0], atol=1e-5)
    # And the gradient pass: the same loss, so the same gradient.
    trained = [call(api, "/api/v1/forward_backward", fb([d], model_id=lora)) for d in layouts]
    assert [t["metrics"]["loss:sum"] for t in trained] == pytest.approx([losses[0]] * 3, rel=1e-5)


def test_a_text_only_datum_with_no_weights_gets_the_clients_zero_weights(api, lora, canonical):
    # The custom-loss forward: the client adds zero weights of the targets' length.
    datum = fireworks_text_only(canonical)
    m = len(datum["loss_fn_inputs"]["target_tokens"]["data"])
    datum["loss_fn_inputs"]["weights"] = {"data": [0.0] * m, "dtype": "float32", "shape": [m]}
    out = call(api, "/api/v1/forward", fb([datum], key="forward_input", model_id=lora))
    assert len(out["loss_fn_outputs"][0]["logprobs"]["data"]) == len(image_next(canonical))


def test_other_target_lengths_name_both_accepted_lengths(api, lora, canonical):
    n = len(canonical["loss_fn_inputs"]["weights"]["data"])
    k = int(image_next(canonical).sum())
    datum = copy.deepcopy(canonical)
    datum["loss_fn_inputs"]["target_tokens"]["data"] = datum["loss_fn_inputs"]["target_tokens"][
        "data"
    ][:-1]
    r = api.post("/api/v1/forward_backward", json=fb([datum], model_id=lora))
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert f"{n - 1} values for {n} input positions" in detail
    assert f"({n})" in detail and f"({n - k}: image tokens left out)" in detail


def test_placeholders_in_text_are_refused_with_how_to_send_the_image(api, lora):
    tokens = [151644, 872, 198, VISION_START, *[IMAGE_PAD] * 4, VISION_END, 3555, 151645]
    datum = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": tokens[1:] + [198], "dtype": "int64"},
            "weights": {"data": [0.0] * (len(tokens) - 1) + [1.0], "dtype": "float32"},
        },
    }
    r = api.post("/api/v1/forward_backward", json=fb([datum], model_id=lora))
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("data[0].model_input.chunks[0]: token 151655 is the image placeholder")
    for needle in ('"type": "image"', '"data": "<base64 PNG or JPEG bytes>"', '"format": "png"',
                   '"expected_tokens": N', "<|vision_start|> (151652)", "<|vision_end|> (151653)",
                   "tinker.types.ImageChunk", "POST /api/v1/image_token_count"):  # fmt: skip
        assert needle in detail, (needle, detail)


def test_loss_mask_is_accepted_and_masks_the_loss(api, lora, canonical):
    n = len(canonical["loss_fn_inputs"]["weights"]["data"])
    mask = [0] * (n // 2) + [1] * (n - n // 2)
    masked = copy.deepcopy(canonical)
    masked["loss_fn_inputs"]["weights"]["data"] = [1.0] * n
    masked["loss_fn_inputs"]["loss_mask"] = {"data": mask, "dtype": "int64", "shape": [n]}
    plain = copy.deepcopy(canonical)
    plain["loss_fn_inputs"]["weights"]["data"] = [float(m) for m in mask]
    got, want = (call(api, "/api/v1/forward", fb([d], key="forward_input", model_id=lora))
                 for d in (masked, plain))  # fmt: skip
    assert got["metrics"]["loss:sum"] == pytest.approx(want["metrics"]["loss:sum"], rel=1e-6)
    bad = copy.deepcopy(masked)
    bad["loss_fn_inputs"]["loss_mask"]["data"] = [2] * n
    r = api.post("/api/v1/forward", json=fb([bad], key="forward_input", model_id=lora))
    assert r.status_code == 400 and "loss_mask: values must be 0 or 1" in r.json()["detail"]


def test_grad_accumulation_normalization_divides_the_gradient(api, lora, canonical):
    # learning_rate 0: the weights stay put, so each step sees the same gradient.
    tokens = sum(1 for w in canonical["loss_fn_inputs"]["weights"]["data"] if w != 0)
    assert tokens > 1

    def grad_norm(passes: int, normalization: str | None) -> float:
        for _ in range(passes):
            call(api, "/api/v1/forward_backward", fb([canonical], model_id=lora))
        body = {"model_id": lora, "adam_params": {"learning_rate": 0.0}, "type": "optim_step"}
        if normalization is not None:
            body["grad_accumulation_normalization"] = normalization
        return call(api, "/api/v1/optim_step", body)["metrics"]["grad_norm"]

    grad_norm(0, None)  # steps past what earlier tests accumulated
    raw = grad_norm(1, None)
    assert grad_norm(1, "none") == pytest.approx(raw, rel=1e-4)
    assert grad_norm(1, "num_loss_tokens") == pytest.approx(raw / tokens, rel=1e-4)
    assert grad_norm(2, "num_sequences") == pytest.approx(raw, rel=1e-4)  # 2 data, 2x summed
    assert grad_norm(2, "none") == pytest.approx(2 * raw, rel=1e-4)
    r = api.post(
        "/api/v1/optim_step", json={"model_id": lora, "grad_accumulation_normalization": "mean"}
    )
    assert r.status_code == 400 and "grad_accumulation_normalization" in r.json()["detail"]


def test_sampler_checkpoint_types_write_what_they_say(server, api, lora):
    paths = {}
    for name, ctype in (("fw-base", "base"), ("fw-delta", "delta"), ("fw-merged", "merged_base")):
        body = {
            "model_id": lora,
            "path": name,
            "checkpoint_type": ctype,
            "type": "save_weights_for_sampler",
        }
        out = call(api, "/api/v1/save_weights_for_sampler", body)
        assert out["path"] == f"tinker://{lora}/sampler_weights/{name}"
        row = server.context.store.checkpoint(lora, "sampler", name)
        assert row["checkpoint_type"] == ("merged" if ctype == "merged_base" else "base")
        paths[ctype] = Path(row["path"])
    # A LoRA run: base and delta are the adapter (a delta stands alone), merged_base the
    # adapter folded into a full model.
    assert (paths["base"] / "adapter_config.json").is_file()
    assert (paths["delta"] / "adapter_config.json").is_file()
    assert not (paths["merged_base"] / "adapter_config.json").exists()
    assert json.loads((paths["merged_base"] / "config.json").read_text())["model_type"]
    body = {
        "model_id": lora,
        "path": "fw-q",
        "checkpoint_type": "merged_base",
        "export_precision": "nvfp4",
    }
    r = api.post("/api/v1/save_weights_for_sampler", json=body)
    assert r.status_code == 400 and "export_precision 'nvfp4'" in r.json()["detail"]


def test_base_only_reference_beside_a_lora_policy_with_its_alpha(server, api, canonical):
    job = new_job(api, lora_rank=4)
    gw = f"/trainer/{job}"
    session = _ok(api.post(f"{gw}/api/v1/create_session", json={}))["session_id"]
    lora = {
        "rank": 4,
        "alpha": 8,
        "seed": 0,
        "train_unembed": True,
        "train_mlp": True,
        "train_attn": True,
    }
    policy = call(api, f"{gw}/api/v1/create_model",
                  {"session_id": session, "model_seq_id": 0, "base_model": MODEL, "lora_config": lora})["model_id"]  # fmt: skip
    reference = call(api, f"{gw}/api/v1/create_model",
                     {"session_id": session, "model_seq_id": 1, "base_model": MODEL, "base_only": True})["model_id"]  # fmt: skip
    engine = server.context.runs.get(policy).engine
    assert engine.config.lora_alpha == 8 and engine.model.peft_config["default"].lora_alpha == 8
    # Train the policy away from the base, then the reference must still be the base.
    adam = {"learning_rate": 0.05}
    for _ in range(2):
        call(api, f"{gw}/api/v1/forward_backward", fb([canonical], model_id=policy))
        call(api, f"{gw}/api/v1/optim_step", {"model_id": policy, "adam_params": adam})
    ref = call(
        api, f"{gw}/api/v1/forward", fb([canonical], key="forward_input", model_id=reference)
    )
    base = call(api, f"{gw}/api/v1/forward_reference", fb([canonical], model_id=policy))
    now = call(api, f"{gw}/api/v1/forward", fb([canonical], key="forward_input", model_id=policy))
    assert ref["metrics"]["loss:sum"] == pytest.approx(base["metrics"]["loss:sum"], rel=1e-4)
    assert abs(now["metrics"]["loss:sum"] - ref["metrics"]["loss:sum"]) > 1e-3
    # Training ops on the reference are refused, naming it and its job.
    for path, body in (("forward_backward", fb([canonical], model_id=reference)),
                       ("optim_step", {"model_id": reference, "adam_params": adam})):  # fmt: skip
        r = api.post(f"{gw}/api/v1/{path}", json=body)
        assert r.status_code == 400, r.text
        assert (
            f"{path}: model {reference} of trainer job {job} is a frozen reference"
            in r.json()["detail"]
        )
    r = api.post(f"{gw}/api/v1/create_model", json={"session_id": session, "model_seq_id": 2,
                 "base_model": MODEL, "base_only": True, "lora_config": {"rank": 4}})  # fmt: skip
    assert r.status_code == 400 and "send no lora_config" in r.json()["detail"]


def test_a_forward_only_job_serves_forward_and_refuses_training(server, api, canonical):
    # A policy trained elsewhere, saved; the reference job's model starts from it.
    policy_job = new_job(api, lora_rank=4)
    policy = new_model(api, f"/trainer/{policy_job}", lora_config={"rank": 4})
    call(api, "/api/v1/forward_backward", fb([canonical], model_id=policy))
    call(api, "/api/v1/optim_step", {"model_id": policy, "adam_params": {"learning_rate": 0.05}})
    call(api, "/api/v1/save_weights", {"model_id": policy, "path": "sft-final"})
    job = new_job(api, lora_rank=4)
    row = server.context.store.job(job)
    server.context.store.update_job(job, config={**row["config"], "forward_only": True})
    gw = f"/trainer/{job}"
    model = new_model(api, gw, lora_config={"rank": 4, "train_unembed": True})
    assert ":reference:" in model
    call(
        api,
        f"{gw}/api/v1/load_weights",
        {"model_id": model, "path": f"cross_job://{policy_job}/sft-final"},
    )
    got, want = (call(api, f"{gw}/api/v1/forward", fb([canonical], key="forward_input", model_id=m))
                 for m in (model, policy))  # fmt: skip
    assert got["metrics"]["loss:sum"] == pytest.approx(want["metrics"]["loss:sum"], rel=1e-5)
    r = api.post(f"{gw}/api/v1/forward_backward", json=fb([canonical], model_id=model))
    assert r.status_code == 400 and f"of trainer job {job} is a frozen reference" in r.text
    r = api.post(f"{gw}/api/v1/optim_step", json={"model_id": model})
    assert r.status_code == 400 and "optim_step" in r.json()["detail"]


def test_a_later_session_of_a_job_resumes_by_bare_name(server, api, canonical):
    job = new_job(api, lora_rank=4)
    gw = f"/trainer/{job}"
    first = new_model(api, gw, lora_config={"rank": 4})
    call(api, f"{gw}/api/v1/forward_backward", fb([canonical], model_id=first))
    call(
        api, f"{gw}/api/v1/optim_step", {"model_id": first, "adam_params": {"learning_rate": 0.01}}
    )
    call(
        api, f"{gw}/api/v1/save_weights", {"model_id": first, "path": "step-1", "overwrite": False}
    )
    assert _ok(api.get(f"{gw}/api/v1/list_checkpoints")) == {"checkpoints": ["step-1"]}
    assert _ok(api.get("/api/v1/list_checkpoints", params={"model_id": first})) == {
        "checkpoints": ["step-1"]
    }
    # A new session of the same job (the cookbook after a restart) loads it by name.
    second = new_model(api, gw, lora_config={"rank": 4})
    out = call(
        api, f"{gw}/api/v1/load_weights", {"model_id": second, "path": "step-1", "optimizer": True}
    )
    assert out["path"] == f"tinker://{first}/weights/step-1" and out["step"] == 1
    # Another job's run names it as cross_job://<job>/<name>.
    other = new_model(api, f"/trainer/{new_job(api, lora_rank=4)}", lora_config={"rank": 4})
    out = call(
        api, "/api/v1/load_weights", {"model_id": other, "path": f"cross_job://{job}/step-1"}
    )
    assert out["path"] == f"tinker://{first}/weights/step-1"
    for path, needle in ((f"cross_job://{job}/step-9", "in any run of trainer job"),
                         ("cross_job://job-000000000000/step-1", "no trainer job")):  # fmt: skip
        r = api.post("/api/v1/load_weights", json={"model_id": other, "path": path})
        assert r.status_code == 404 and needle in r.json()["detail"], r.text
    r = api.get("/api/v1/list_checkpoints")
    assert r.status_code == 400 and "/trainer/<job_id>/" in r.json()["detail"]


def test_top_k_zero_means_no_limit(api, lora):
    assert WireSamplingParams(top_k=0).to_params().top_k == -1
    snapshot = call(api, "/api/v1/save_weights_for_sampler", {"model_id": lora})[
        "sampling_session_id"
    ]
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [151644, 872, 198, 3555]}]}
    body = {"sampling_session_id": snapshot, "prompt": prompt, "num_samples": 1,
            "sampling_params": {"max_tokens": 2, "top_k": 0, "temperature": 1.0}}  # fmt: skip
    out = call(api, "/api/v1/asample", body)
    assert len(out["sequences"]) == 1 and len(out["sequences"][0]["tokens"]) >= 1
    r = api.post("/api/v1/asample", json={**body, "sampling_params": {"top_k": -2}})
    assert r.status_code == 400 and "top_k" in r.json()["detail"]
