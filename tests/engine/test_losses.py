"""Losses against values computed by hand (see each docstring)."""

import math

import pytest
import torch

from vlmtune.engine import losses


def test_cross_entropy_is_weighted_sum():
    """logp = [[-1, -2], [-0.5, -3]], w = [[1, 0], [0.5, 1]]
    loss = -(1*-1 + 0 + 0.5*-0.5 + 1*-3) = 1 + 0.25 + 3 = 4.25; 3 weighted tokens."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    w = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    loss, m = losses.cross_entropy_loss(logp, w)
    assert loss.item() == pytest.approx(4.25)
    assert m["num_weighted_tokens:sum"] == 3


def test_importance_sampling_on_policy_gradient_is_reinforce():
    """On-policy (logp == sampler logp) the ratio is 1: loss = -sum(A) = -(2 - 1) = -1,
    and d loss / d logp_t = -A_t (the REINFORCE gradient)."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]])
    loss, m = losses.importance_sampling_loss(logp, logp.detach(), adv)
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert logp.grad.tolist() == [[-2.0, 1.0]]
    assert m["ratio:mean"] == pytest.approx(1.0)


def test_ppo_clips_the_ratio():
    """r = exp(0.5) = 1.6487 > 1.2 with A = 1: min(1.6487, 1.2) = 1.2, loss = -1.2, no grad.
    r = exp(-0.5) = 0.6065 < 0.8 with A = -1: min(-0.6065, -0.8) = -0.8, loss += 0.8.
    r = 1 with A = 3: surrogate 3. Total loss = -1.2 + 0.8 - 3 = -3.4."""
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.5, -0.5, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 3.0]])
    loss, m = losses.ppo_clip_loss(logp, old, adv, clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-3.4, abs=1e-4)
    loss.backward()
    # clipped tokens get no gradient; the unclipped one gets -A * r = -3
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, -3.0])
    assert m["clip_fraction:mean"] == pytest.approx(2 / 3)


def test_dpo_loss_by_hand():
    """beta = 0.1; pi_c - ref_c = -1 - (-2) = 1; pi_r - ref_r = -3 - (-2) = -1.
    margin h = 0.1 * (1 - (-1)) = 0.2; loss = -log(sigmoid(0.2)) = log(1 + e^-0.2) = 0.598139."""
    loss, m = losses.dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.0]),
        beta=0.1,
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert m["reward_accuracy"] == 1.0
    assert m["reward_margin"] == pytest.approx(0.2)
    assert m["chosen_reward"] == pytest.approx(0.1)
    assert m["rejected_reward"] == pytest.approx(-0.1)


def test_dpo_label_smoothing_by_hand():
    """eps = 0.1, h = 0.2: loss = 0.9 * log(1+e^-0.2) + 0.1 * log(1+e^0.2)
    = 0.9 * 0.598139 + 0.1 * 0.798139 = 0.618139."""
    loss, _ = losses.dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.0]),
        beta=0.1,
        label_smoothing=0.1,
    )
    assert loss.item() == pytest.approx(0.618139, abs=1e-6)


def test_group_advantages_by_hand():
    """rewards [1, 0, 0, 1]: mean 0.5 -> [0.5, -0.5, -0.5, 0.5]; population std 0.5 -> [1, -1, -1, 1]."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert losses.group_advantages(r).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert losses.group_advantages(r, normalize_std=True).tolist() == pytest.approx(
        [1, -1, -1, 1], abs=1e-4
    )


def test_kl_k3_is_zero_when_equal_and_positive_otherwise():
    """d = ref - pi = 1: e^1 - 1 - 1 = 0.718282."""
    assert losses.kl_penalty_k3(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0
    assert losses.kl_penalty_k3(torch.tensor([-2.0]), torch.tensor([-1.0])).item() == pytest.approx(
        0.718282, abs=1e-6
    )


def test_dpo_reward_accuracy_counts_float_noise_ties_as_half():
    """beta = 0.1, three pairs (policy chosen, policy rejected, ref chosen, ref rejected):
    a win (-1, -3, -2, -2): margin 0.2 -> 1; an exact tie (all -2): margin 0 -> 0.5;
    float noise (-8 - 1 ulp, -8, -8, -8): margin -0.1 * 2^-20 = -9.5e-8, inside the
    tolerance 0.1 * 64 * 2^-23 * 32 = 2.4e-5 -> a tie, 0.5 (a strict ``>`` called it a loss).
    accuracy = (1 + 0.5 + 0.5) / 3 = 2/3, ties 2/3. A margin of 1e-4 (pc = -8 + 1e-3)
    is outside the tolerance: a win."""
    below_8 = torch.nextafter(torch.tensor(-8.0), torch.tensor(-9.0)).item()
    assert below_8 == -8.0 - 2**-20  # one float32 ulp beyond 8
    _, m = losses.dpo_loss(
        torch.tensor([-1.0, -2.0, below_8]),
        torch.tensor([-3.0, -2.0, -8.0]),
        torch.tensor([-2.0, -2.0, -8.0]),
        torch.tensor([-2.0, -2.0, -8.0]),
        beta=0.1,
    )
    assert m["reward_accuracy"] == pytest.approx(2 / 3)
    assert m["reward_ties"] == pytest.approx(2 / 3)
    _, m = losses.dpo_loss(
        torch.tensor([-8.0 + 1e-3]),
        torch.tensor([-8.0]),
        torch.tensor([-8.0]),
        torch.tensor([-8.0]),
        beta=0.1,
    )
    assert m["reward_accuracy"] == 1.0 and m["reward_ties"] == 0.0


# ---- the registry -------------------------------------------------------------------------
def test_registry_ppo_reads_clip_thresholds_with_fallbacks():
    """Tinker's ``clip_*_threshold`` wins over the short ``clip_*``; absent, 0.2."""
    ppo = losses.loss_spec("ppo")
    assert ppo.kwargs({}) == {"clip_low": 0.2, "clip_high": 0.2}
    assert ppo.kwargs({"clip_low": 0.1}) == {"clip_low": 0.1, "clip_high": 0.2}
    both = {"clip_low_threshold": 0.3, "clip_low": 0.1, "clip_high_threshold": 0.5}
    assert ppo.kwargs(both) == {"clip_low": 0.3, "clip_high": 0.5}
    assert ppo.config_keys == ("clip_low_threshold", "clip_low", "clip_high_threshold", "clip_high")


def test_registry_call_is_the_loss_by_hand():
    """The PPO example above through the registry, clip_high 0.8 instead of 0.2:
    r = 1.6487 < 1.8 is no longer clipped, so loss = -1.6487 + 0.8 - 3 = -3.8487."""
    inputs = {"logprobs": torch.zeros(1, 3), "advantages": torch.tensor([[1.0, -1.0, 3.0]])}
    logp = torch.tensor([[0.5, -0.5, 0.0]])
    loss, m = losses.loss_spec("ppo")(logp, inputs, {"clip_high_threshold": 0.8})
    assert loss.item() == pytest.approx(-math.exp(0.5) + 0.8 - 3, abs=1e-5)
    assert m["clip_fraction:mean"] == pytest.approx(1 / 3)


def test_registry_required_inputs_and_positions():
    """cross_entropy's weights may be omitted (a server fills 1.0); the RL losses need
    the sampler's logprobs and the advantages, which also mark the positions."""
    spec = losses.LOSSES
    assert spec["cross_entropy"].required_inputs == ("target_tokens",)
    assert spec["cross_entropy"].fill == {"weights": 1.0}
    for name in ("importance_sampling", "ppo"):
        assert spec[name].required_inputs == ("target_tokens", "logprobs", "advantages")
        assert spec[name].positions == "advantages"
    assert losses.known_inputs() == ("target_tokens", "weights", "logprobs", "advantages")


def test_unknown_loss_names_the_built_ins():
    with pytest.raises(ValueError) as e:
        losses.loss_spec("dpo")
    assert str(e.value) == (
        "unknown loss_fn 'dpo'; built-ins: ['cross_entropy', 'importance_sampling', 'ppo']"
    )
