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
