"""vlmtune's own SDK over HTTP: a trainer job, an SFT loop, promotion, chat completions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import assistant, image_part, user
from vlmtune.sdk import AdamParams, SamplingParams, ServiceClient, scale_weights
from vlmtune.sdk.http import HttpTrainingClient, RemoteError, remote_chat_completion
from vlmtune.sdk.jobs import TrainerJobConfig, TrainerJobManager

MODEL = "tiny-qwen3-vl"


@pytest.fixture(scope="module")
def trainer(server, key):
    manager = TrainerJobManager(server.url, key)
    config = TrainerJobConfig(
        base_model=MODEL, lora_rank=8, learning_rate=2e-2, gradient_accumulation_steps=1,
        display_name="digits",
    )  # fmt: skip
    endpoint = manager.create_and_wait(config)
    assert endpoint.state == "running" and endpoint.base_url.endswith(endpoint.job_id)
    service = ServiceClient(base_url=endpoint.base_url, api_key=key)
    tc = service.create_lora_training_client(MODEL, rank=8, min_pixels=4096, max_pixels=4096)
    return manager, endpoint, tc


def test_remote_sft_loop_sampling_and_custom_loss(trainer):
    _, endpoint, tc = trainer
    assert isinstance(tc, HttpTrainingClient)
    info = tc.get_info()
    assert info["mode"] == "lora" and info["lora_rank"] == 8 and info["job_id"] == endpoint.job_id
    question = user(image_part(32, 32, seed=5), "What digit is this?")
    datum = tc.datum_from_messages([question, assistant("5")])
    assert [c.type for c in datum.model_input.chunks] == ["encoded_text", "image", "encoded_text"]
    losses = []
    for _ in range(10):
        fb = tc.forward_backward(scale_weights([datum], 0.5))
        opt = tc.optim_step(AdamParams(learning_rate=2e-2))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    assert np.mean(losses[-3:]) < 0.6 * losses[0], losses
    assert tc.get_info()["step"] == 10

    def neg_ll(datums, logprobs):
        loss = sum(
            -(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
            for d, lp in zip(datums, logprobs, strict=True)
        )
        return loss, {"nll:sum": float(loss.detach())}

    out = tc.forward_backward_custom([datum], neg_ll).result()
    assert out.metrics["loss:sum"] == pytest.approx(out.metrics["nll:sum"])
    seen = []

    def response_only(datums, logprobs):
        seen.append(logprobs[0].detach().clone())
        return neg_ll(datums, logprobs)

    # Same loss, logprobs at the weighted positions only (0 elsewhere), as in-process.
    tc.forward_backward_custom([datum], response_only, logprobs_where="weights").result()
    w_T = datum.loss_fn_inputs["weights"].to_torch()
    assert (seen[0][w_T == 0] == 0).all() and (seen[0][w_T != 0] != 0).all()
    # A loss may leave a datum's logprobs unread: that datum gets no gradient (zero
    # surrogate weights), as in-process, rather than failing on a missing .grad.
    other = tc.datum_from_messages([user("Say 3."), assistant("3")])
    first_only = tc.forward_backward_custom(
        [datum, other], lambda ds, lps: neg_ll(ds[:1], lps[:1])
    ).result()
    assert first_only.metrics["loss:sum"] == pytest.approx(first_only.metrics["nll:sum"])
    assert first_only.metrics["surrogate_loss:sum"] == pytest.approx(
        first_only.metrics["loss:sum"], rel=1e-3
    )
    tc.optim_step(AdamParams(learning_rate=1e-3)).result()

    sampler = tc.create_sampling_client()
    prompt = tc.renderer.render_prompt([question]).model_input
    response = sampler.sample(prompt, 2, SamplingParams(max_tokens=4, temperature=0)).result()
    assert all(s.tokens and len(s.logprobs) == len(s.tokens) for s in response.sequences)
    many = sampler.sample_many([prompt, prompt], 1, SamplingParams(max_tokens=2)).result()
    assert len(many) == 2
    lps = sampler.compute_logprobs(prompt).result()
    assert lps[0] is None and len(lps) == prompt.length


def test_state_round_trip_and_image_token_count(trainer, api):
    _, _, tc = trainer
    path = tc.save_state("remote-state", extra={"step": 11}).result()
    assert path.endswith("/weights/remote-state")
    assert tc.load_state("remote-state").result() == {"step": 11}
    assert any(c["tinker_path"] == path for c in tc.list_checkpoints())
    from tests.server.conftest import b64_png

    counts = api.post(
        "/api/v1/image_token_count",
        json={
            "model_id": tc.model_id,
            "images": [{"data": b64_png(32, 32)}, {"width": 640, "height": 480}],
        },
    ).json()
    assert counts["tokens"][0] == tc.renderer.image_preprocessor.num_tokens(32, 32) == 4
    with pytest.raises(RemoteError) as err:
        tc.load_state("no-such-state").result()
    assert err.value.status == 404


def test_promote_checkpoint_and_chat(trainer, server, key):
    manager, endpoint, tc = trainer
    question = user(image_part(32, 32, seed=5), "What digit is this?")
    for kind in ("base", "merged"):
        name = tc.save_weights_for_sampler_ext(f"snap-{kind}", kind)
        model = manager.promote_checkpoint(endpoint.job_id, name, f"digits-{kind}")
        assert model["id"] == f"digits-{kind}"
        answer = remote_chat_completion(server.url, key, f"digits-{kind}", [question], max_tokens=4)
        assert isinstance(answer, str)
    with pytest.raises(RemoteError) as err:
        manager.promote_checkpoint(endpoint.job_id, "snap-base", "digits-base")
    assert "already exists" in err.value.message
    with pytest.raises(ValueError):
        manager.promote_checkpoint(endpoint.job_id, "snap-base", "Bad_Name")
    assert manager.resolve_training_profile("default")["shape_id"] == "default"
    with pytest.raises(KeyError, match="not implemented"):
        manager.resolve_training_profile("h100-8x")
    assert endpoint.job_id in [e.job_id for e in manager.list()]
