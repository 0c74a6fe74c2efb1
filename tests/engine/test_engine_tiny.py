"""The engine on the real tiny Qwen3-VL (CPU): parity with the HF model, primitives, state."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assistant, image_part, user
from vlmtune.engine.batching import IMAGE, TEXT, mrope_position_ids
from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.render import datum_from_rendered
from vlmtune.sdk import AdamParams, SamplingParams, ServiceClient


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return TrainingEngine(
        EngineConfig(
            base_model=str(tiny_dir), mode="full", freeze_vision_tower=False, freeze_projector=False
        )
    )


def conversation(seed: int = 0, answer: str = "7"):
    return [user(image_part(64, 32, seed), "What digit is this?"), assistant(answer)]


def two_images():
    return [
        user(image_part(32, 32, 1), "first"),
        assistant("one"),
        user(image_part(96, 64, 2), "second"),
        assistant("two"),
    ]


def test_mrope_positions_equal_the_models_get_rope_index(engine):
    rendered = engine.renderer.render(two_images())
    batch = engine.collate([datum_from_rendered(rendered, engine.image_token_id)])
    ids = batch.input_ids_B_T
    types = (ids == engine.image_token_id).int()
    expected, _ = engine.backbone.get_rope_index(ids, types, image_grid_thw=batch.image_grid_thw)
    assert torch.equal(batch.position_ids_4_B_T[1:], expected)


def test_mrope_positions_by_hand():
    """text x2, a 4x6 patch grid (2x3 merged), text x1: the image starts at 2, spans
    rows 2..3 and columns 2..4; the next text position is 2 + max(2, 3) = 5."""
    pos = mrope_position_ids([TEXT, TEXT] + [IMAGE] * 6 + [TEXT], [(1, 4, 6)], spatial_merge=2)
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 2:8].tolist() == [2] * 6
    assert pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3]
    assert pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]
    assert pos[:, 8].tolist() == [5, 5, 5]


def test_cross_entropy_equals_hf_models_own_loss(engine):
    """Our chunked, weighted-positions-only path gives the HF forward's logprobs."""
    rendered = engine.renderer.render(two_images())
    datum = datum_from_rendered(rendered, engine.image_token_id)
    out = engine.forward([datum])
    ours = torch.tensor(out.loss_fn_outputs[0]["logprobs"].data)
    weights = torch.tensor(datum.loss_fn_inputs["weights"].data)
    batch = engine.collate([datum])
    with torch.no_grad():
        logits = engine.hf_model(
            input_ids=batch.input_ids_B_T,
            attention_mask=batch.attention_mask_B_T,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            mm_token_type_ids=(batch.input_ids_B_T == engine.image_token_id).int(),
        ).logits[0]
    ref = (
        torch.log_softmax(logits.float(), -1)
        .gather(-1, batch.targets_B_T[0].unsqueeze(-1))
        .squeeze(-1)
    )
    mask = weights != 0
    assert mask.sum() >= 4
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-4, rtol=1e-4)
    assert out.metrics["loss:sum"] == pytest.approx(float(-(ref * weights).sum()), rel=1e-4)


def test_padded_batch_equals_single_examples(engine):
    d1 = datum_from_rendered(engine.renderer.render(conversation(0, "3")), engine.image_token_id)
    d2 = datum_from_rendered(engine.renderer.render(two_images()), engine.image_token_id)
    engine.config.micro_batch_size = 2
    try:
        together = engine.forward([d1, d2]).loss_fn_outputs
    finally:
        engine.config.micro_batch_size = 1
    alone = [engine.forward([d]).loss_fn_outputs[0] for d in (d1, d2)]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(
            torch.tensor(a["logprobs"].data), torch.tensor(b["logprobs"].data), atol=1e-4, rtol=1e-4
        )


def test_custom_loss_gives_the_same_gradients_as_cross_entropy(engine):
    datum = datum_from_rendered(engine.renderer.render(conversation(1)), engine.image_token_id)
    params = [p for p in engine.model.parameters() if p.requires_grad]

    engine.forward_backward([datum])
    g_builtin = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    def sft_loss(data, logprobs):
        w = torch.tensor(data[0].loss_fn_inputs["weights"].data)
        return -(logprobs[0] * w).sum(), {}

    for where in (None, "weights"):
        out = engine.forward_backward_custom([datum], sft_loss, logprobs_where=where)
        for a, p in zip(g_builtin, params, strict=True):
            assert (p.grad - a).norm() <= 1e-4 * a.norm() + 1e-6
        for p in params:
            p.grad = None
        lp_T = out.loss_fn_outputs[0]["logprobs"].to_torch()
        w_T = datum.loss_fn_inputs["weights"].to_torch()
        if where is None:
            all_T = lp_T
        else:  # the response positions only: the same values there, 0 elsewhere
            assert torch.equal(lp_T[w_T == 0], torch.zeros(int((w_T == 0).sum())))
            torch.testing.assert_close(lp_T[w_T != 0], all_T[w_T != 0])
    with pytest.raises(ValueError, match=r"datum 0 has no loss_fn_inputs\['advantages'\]"):
        engine.forward_backward_custom([datum], sft_loss, logprobs_where="advantages")


def test_frozen_vision_tower_gets_no_gradient(tiny_dir):
    eng = TrainingEngine(EngineConfig(base_model=str(tiny_dir), mode="full"))
    assert not eng.vision_trainable
    datum = datum_from_rendered(eng.renderer.render(conversation()), eng.image_token_id)
    eng.forward_backward([datum])
    assert all(p.grad is None for p in eng.backbone.visual.parameters())
    assert any(p.grad is not None for p in eng.backbone.language_model.parameters())


def test_the_documented_loop_lowers_the_loss_with_lora(tiny_dir, tmp_path):
    """The README loop: forward_backward_custom + optim_step, with a LoRA client."""
    service = ServiceClient(checkpoint_root=tmp_path)
    tc = service.create_lora_training_client(str(tiny_dir), rank=8)
    datum = tc.datum_from_messages(conversation(2, "5"))

    def sft_loss(data, logprobs):
        w = torch.tensor(data[0].loss_fn_inputs["weights"].data)
        return -(logprobs[0] * w).sum() / w.sum(), {}

    losses = []
    for _ in range(20):
        out = tc.forward_backward_custom([datum], sft_loss).result()
        tc.optim_step(AdamParams(learning_rate=1e-2)).result()
        losses.append(out.metrics["loss:sum"])
    assert losses[-1] < 0.5 * losses[0]

    sampler = tc.create_sampling_client()
    prompt = tc.renderer.render_prompt(conversation(2, "5")[:1]).model_input
    resp = sampler.sample(prompt, 2, SamplingParams(max_tokens=5, temperature=0.0)).result()
    assert len(resp.sequences) == 2 and resp.sequences[0].tokens == resp.sequences[1].tokens
    assert tc.renderer.decode(resp.sequences[0].tokens).strip() == "5"
    assert len(resp.sequences[0].logprobs) == len(resp.sequences[0].tokens)


def test_save_and_load_state_round_trip(tiny_dir, tmp_path):
    service = ServiceClient(checkpoint_root=tmp_path)
    tc = service.create_lora_training_client(str(tiny_dir), rank=4)
    datum = tc.datum_from_messages(conversation(3))
    adam = AdamParams(learning_rate=1e-3)
    for _ in range(2):
        tc.forward_backward([datum]).result()
        tc.optim_step(adam).result()
    path = tc.save_state("step-2", extra={"step": 2}).result()
    # continue two more steps, remember the loss
    tc.forward_backward([datum]).result()
    tc.optim_step(adam).result()
    expected = tc.forward([datum]).result().metrics["loss:sum"]

    tc2 = service.create_lora_training_client(str(tiny_dir), rank=4)
    assert tc2.load_state(path).result() == {"step": 2}
    tc2.forward_backward([datum]).result()
    tc2.optim_step(adam).result()
    assert tc2.forward([datum]).result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)


def test_image_token_mismatch_is_refused(engine):
    datum = datum_from_rendered(engine.renderer.render(conversation()), engine.image_token_id)
    chunk = next(c for c in datum.model_input.chunks if c.type == "image")
    chunk.expected_tokens += 1
    with pytest.raises(ValueError, match="expects .* tokens but the processor makes"):
        engine.forward([datum])


def test_reference_forward_is_the_base_model(tiny_dir, tmp_path):
    service = ServiceClient(checkpoint_root=tmp_path)
    for rank in (4, 0):
        tc = service.create_training_client(str(tiny_dir), lora_rank=rank)
        datum = tc.datum_from_messages(conversation(4, "8"))
        base = tc.forward([datum]).result().metrics["loss:sum"]
        for _ in range(3):
            tc.forward_backward([datum]).result()
            tc.optim_step(AdamParams(learning_rate=1e-2)).result()
        assert tc.forward([datum]).result().metrics["loss:sum"] != pytest.approx(base, rel=1e-3)
        assert tc.forward_reference([datum]).result().metrics["loss:sum"] == pytest.approx(
            base, rel=1e-5
        )


def test_unseeded_samples_differ_from_call_to_call_and_seeded_ones_repeat(engine):
    """Sampling runs on a forked RNG (training's random state stays as it was). An
    unseeded call once started from the same restored state every time, so n separate
    one-sample requests (an RL group) came back identical."""
    prompt = engine.renderer.render_prompt(conversation(3)[:1]).model_input
    params = SamplingParams(max_tokens=6, temperature=1.0)

    def draw(seed: int | None) -> list[int]:
        p = params.model_copy(update={"seed": seed})
        return engine.sample([prompt], 1, p)[0].sequences[0].tokens

    unseeded = {tuple(draw(None)) for _ in range(4)}
    assert len(unseeded) > 1  # random weights: 6 tokens from a ~150k vocabulary
    assert draw(7) == draw(7)
    state = torch.random.get_rng_state()
    draw(None)
    assert torch.equal(torch.random.get_rng_state(), state)
