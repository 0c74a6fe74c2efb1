"""The official ``tinker`` client against ``vlmtune serve``: a LoRA SFT loop on the tiny VLM."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types as tt

from tests.conftest import assistant as assistant_msg
from tests.conftest import image_part, user
from vlmtune.render import datum_from_rendered
from vlmtune.sdk.http import local_renderer

MODEL = "tiny-qwen3-vl"


def to_tinker_input(model_input) -> tt.ModelInput:
    return tt.ModelInput(
        chunks=[
            tt.EncodedTextChunk(tokens=list(c.tokens))
            if c.type == "encoded_text"
            else tt.ImageChunk(data=c.data, format="png", expected_tokens=c.expected_tokens)
            for c in model_input.chunks
        ]
    )


def to_tinker(datum) -> tt.Datum:
    inputs = {
        k: np.asarray(v.data, dtype=np.int64 if v.dtype == "int64" else np.float32)
        for k, v in datum.loss_fn_inputs.items()
    }
    return tt.Datum(model_input=to_tinker_input(datum.model_input), loss_fn_inputs=inputs)


@pytest.fixture(scope="module")
def run(server, key, api):
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    tc = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0).result()
    limits = api.post(
        "/api/v1/image_token_count", json={"model_id": tc.model_id, "images": []}
    ).json()
    renderer = local_renderer(MODEL, limits["min_pixels"], limits["max_pixels"], 1)
    yield service, tc, renderer
    service.close("success").result()


def test_lora_sft_loop_loss_falls_and_samples(run):
    _, tc, renderer = run
    question = user(image_part(32, 32, seed=3), "What digit is this?")
    rendered = renderer.render([question, assistant_msg("3")])
    datum = to_tinker(datum_from_rendered(rendered, renderer.image_token_id))
    assert any(isinstance(c, tt.ImageChunk) for c in datum.model_input.chunks)
    losses = []
    for _ in range(12):
        fb = tc.forward_backward([datum], "cross_entropy")  # both submitted, then awaited
        opt = tc.optim_step(tt.AdamParams(learning_rate=1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        assert "grad_norm" in opt.result().metrics
    assert np.mean(losses[-3:]) < 0.6 * losses[0], losses

    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = to_tinker_input(renderer.render_prompt([question]).model_input)
    params = tt.SamplingParams(max_tokens=4, temperature=1.0)
    out = sampler.sample(prompt, 2, params).result()
    assert len(out.sequences) == 2
    assert all(len(s.tokens) >= 1 and len(s.logprobs) == len(s.tokens) for s in out.sequences)

    text = tt.ModelInput.from_ints(renderer.tokenizer.encode("hello there world"))
    lps = sampler.compute_logprobs(text).result()
    assert lps[0] is None and all(isinstance(x, float) and x < 0 for x in lps[1:])


def test_image_token_mismatch_is_a_400_naming_both_numbers(run):
    _, tc, renderer = run
    rendered = renderer.render([user(image_part(32, 32), "hi"), assistant_msg("ok")])
    datum = to_tinker(datum_from_rendered(rendered, renderer.image_token_id))
    image = next(c for c in datum.model_input.chunks if isinstance(c, tt.ImageChunk))
    wrong = image.expected_tokens + 5
    chunks = [
        tt.ImageChunk(data=c.data, format="png", expected_tokens=wrong) if c is image else c
        for c in datum.model_input.chunks
    ]
    # The same number of positions, so only the image check can object.
    text = chunks[-1]
    chunks[-1] = tt.EncodedTextChunk(tokens=list(text.tokens)[: len(text.tokens) - 5])
    bad = tt.Datum(
        model_input=tt.ModelInput(chunks=chunks),
        loss_fn_inputs={k: v.to_numpy() for k, v in datum.loss_fn_inputs.items()},
    )
    with pytest.raises(tinker.BadRequestError) as err:
        tc.forward_backward([bad], "cross_entropy").result()
    message = str(err.value)
    assert f"expects {wrong} tokens" in message and f"makes {image.expected_tokens}" in message


def test_custom_loss_save_load_and_from_state(run, server, key):
    service, tc, renderer = run
    ids = renderer.tokenizer.encode("one two three four five")
    datum = tt.Datum(
        model_input=tt.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": np.asarray(ids[1:]),
            "weights": np.ones(len(ids) - 1, np.float32),
        },
    )

    def neg_ll(data, logprobs):
        loss = sum(
            -(lp * d.loss_fn_inputs["weights"].to_torch()).sum()
            for d, lp in zip(data, logprobs, strict=True)
        )
        return loss, {"nll:sum": float(loss.detach())}

    out = tc.forward_backward_custom([datum], neg_ll).result()
    assert out.metrics["nll:sum"] == pytest.approx(out.metrics["loss:sum"])
    assert out.metrics["surrogate_loss:sum"] == pytest.approx(out.metrics["loss:sum"], rel=1e-4)
    tc.optim_step(tt.AdamParams(learning_rate=1e-3)).result()

    saved = tc.save_state("tinker-state").result()
    assert saved.path.startswith(f"tinker://{tc.model_id}/weights/")
    rest = tinker.RestClient(base_url=server.url, api_key=key)
    listed = rest.list_checkpoints(tc.model_id).result()
    assert any(c.tinker_path == saved.path for c in listed.checkpoints)
    before = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    clone = service.create_training_client_from_state_with_optimizer(saved.path).result()
    after = (
        clone.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    )
    np.testing.assert_allclose(before, after, atol=1e-5)


def test_wrong_or_missing_key_is_refused(server):
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(
            base_url=server.url, api_key="tml-0000aaaa_wrong"
        ).create_lora_training_client(base_model=MODEL, rank=8).result()
