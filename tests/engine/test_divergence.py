"""The engine refuses a non-finite step and non-finite weights; nothing is applied or saved."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assistant, image_part, user
from vlmtune.engine.divergence import DivergedError
from vlmtune.engine.optim import clip_and_step, new_adamw
from vlmtune.sdk import AdamParams, ServiceClient


def test_a_non_finite_grad_norm_is_not_applied():
    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    optimizer = new_adamw(params, 1e-3)
    before = [p.detach().clone() for p in params]
    layer.weight.grad = torch.full_like(layer.weight, float("nan"))
    layer.bias.grad = torch.ones_like(layer.bias)

    with pytest.raises(DivergedError, match="grad_norm is nan; the optimizer step was not"):
        clip_and_step(optimizer, params, AdamParams(learning_rate=1e-3), torch.device("cpu"))

    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(p.grad is None for p in params)  # the next step starts clean
    assert not optimizer.state  # Adam's moments did not see the NaN

    # ...and a finite step afterwards trains as usual
    layer(torch.ones(1, 3)).sum().backward()
    norm = clip_and_step(optimizer, params, AdamParams(learning_rate=1e-3), torch.device("cpu"))
    assert norm > 0 and not torch.equal(layer.bias, before[1])


def test_the_engine_refuses_to_step_on_or_save_non_finite_values(tiny_dir, tmp_path):
    tc = ServiceClient(checkpoint_root=tmp_path).create_lora_training_client(str(tiny_dir), rank=4)
    datum = tc.datum_from_messages([user(image_part(32, 32, 1), "digit?"), assistant("7")])
    huge = AdamParams(learning_rate=1e30)
    tc.forward_backward([datum]).result()
    tc.optim_step(huge).result()  # finite gradient: applied; the weights jump by ~1e30
    step = tc.engine.step
    tc.forward_backward([datum]).result()
    with pytest.raises(DivergedError, match="grad_norm is"):
        tc.optim_step(huge).result()
    assert tc.engine.step == step  # the refused step does not count

    with torch.no_grad():
        tc.engine.trainable_params[0].fill_(float("nan"))
    with pytest.raises(DivergedError, match="not finite"):
        tc.save_weights_for_sampler(str(tmp_path / "final")).result()
    assert not (tmp_path / "final").exists()
    with pytest.raises(DivergedError, match="not finite"):
        tc.save_state("step-9").result()
    assert not list(tmp_path.glob("**/step-9"))
