"""Losses as pure functions of per-token log-probabilities.

Every function takes padded ``(B, T)`` tensors whose padding positions carry zero
weight/advantage, returns a scalar loss to *sum* into the gradient (no hidden mean:
callers normalise through the weights they pass, so gradient accumulation and data
parallelism compose exactly), and a dict of float metrics.

Built-in loss names follow the hosted training SDKs (Tinker): ``cross_entropy``,
``importance_sampling``, ``ppo``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossOutput = tuple[torch.Tensor, dict[str, float]]


def cross_entropy_loss(logprobs_B_T: torch.Tensor, weights_B_T: torch.Tensor) -> LossOutput:
    """Weighted sum of token negative log-likelihoods: ``-sum(w * logp)``.

    Reference: Tinker's ``cross_entropy`` loss (sum, not mean: the recipe decides the
    normalisation by scaling ``weights``, e.g. ``1 / total_weighted_tokens``).
    """
    loss = -(weights_B_T * logprobs_B_T).sum()
    n_tokens = float((weights_B_T != 0).sum())
    return loss, {"loss:sum": float(loss.detach()), "num_weighted_tokens:sum": n_tokens}


def importance_sampling_loss(
    logprobs_B_T: torch.Tensor,
    sampler_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
) -> LossOutput:
    """REINFORCE with an importance weight for the sampler/learner mismatch.

    ``loss = -sum(exp(logp - logp_sampler) * A)``; its gradient is
    ``-sum(ratio * A * grad logp)``, the off-policy policy gradient
    (Tinker's ``importance_sampling`` loss).
    """
    ratio_B_T = torch.exp(logprobs_B_T - sampler_logprobs_B_T)
    loss = -(ratio_B_T * advantages_B_T).sum()
    mask = advantages_B_T != 0
    mean_ratio = float(ratio_B_T.detach()[mask].mean()) if mask.any() else 1.0
    return loss, {"loss:sum": float(loss.detach()), "ratio:mean": mean_ratio}


def ppo_clip_loss(
    logprobs_B_T: torch.Tensor,
    sampler_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> LossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), summed over tokens.

    ``loss = -sum(min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A))`` with
    ``r = exp(logp - logp_old)``. Asymmetric bounds allow DAPO-style "clip-higher".
    """
    ratio_B_T = torch.exp(logprobs_B_T - sampler_logprobs_B_T)
    clipped_B_T = torch.clamp(ratio_B_T, 1.0 - clip_low, 1.0 + clip_high)
    surrogate_B_T = torch.minimum(ratio_B_T * advantages_B_T, clipped_B_T * advantages_B_T)
    loss = -surrogate_B_T.sum()
    mask = advantages_B_T != 0
    clip_frac = (
        float((ratio_B_T != clipped_B_T).detach()[mask].float().mean()) if mask.any() else 0.0
    )
    return loss, {"loss:sum": float(loss.detach()), "clip_fraction:mean": clip_frac}


def dpo_loss(
    policy_chosen_logps_P: torch.Tensor,
    policy_rejected_logps_P: torch.Tensor,
    reference_chosen_logps_P: torch.Tensor,
    reference_rejected_logps_P: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Sigmoid DPO loss (Rafailov et al. 2023, eq. 7), mean over pairs.

    With ``h = beta * ((pi_c - ref_c) - (pi_r - ref_r))`` on summed response
    log-probabilities, ``loss = -(1 - eps) * logsigmoid(h) - eps * logsigmoid(-h)``
    (conservative DPO when ``eps = label_smoothing > 0``).
    """
    chosen_rewards_P = beta * (policy_chosen_logps_P - reference_chosen_logps_P)
    rejected_rewards_P = beta * (policy_rejected_logps_P - reference_rejected_logps_P)
    margin_P = chosen_rewards_P - rejected_rewards_P
    losses_P = -(1 - label_smoothing) * F.logsigmoid(margin_P) - label_smoothing * F.logsigmoid(
        -margin_P
    )
    loss = losses_P.mean()
    metrics = {
        "dpo_loss": float(loss.detach()),
        "reward_accuracy": float((margin_P > 0).float().mean()),
        "reward_margin": float(margin_P.detach().mean()),
        "chosen_reward": float(chosen_rewards_P.detach().mean()),
        "rejected_reward": float(rejected_rewards_P.detach().mean()),
        "chosen_logratio": float(
            (policy_chosen_logps_P - reference_chosen_logps_P).detach().mean()
        ),
        "rejected_logratio": float(
            (policy_rejected_logps_P - reference_rejected_logps_P).detach().mean()
        ),
    }
    return loss, metrics


def group_advantages(
    rewards_G: torch.Tensor, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages for one group of completions of the same prompt.

    ``A_i = r_i - mean(r)``, optionally divided by ``std(r) + eps`` (Shao et al. 2024,
    DeepSeekMath §4.1.2; Dr. GRPO drops the std division, hence the flag).
    """
    centered_G = rewards_G - rewards_G.mean()
    if normalize_std:
        return centered_G / (rewards_G.std(unbiased=False) + eps)
    return centered_G


def kl_penalty_k3(logprobs_B_T: torch.Tensor, ref_logprobs_B_T: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) (Schulman 2020): ``exp(d) - d - 1``, d = ref - pi.

    Non-negative and unbiased for samples drawn from pi.
    """
    d_B_T = ref_logprobs_B_T - logprobs_B_T
    return torch.exp(d_B_T) - d_B_T - 1


BUILTIN_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "cross_entropy": cross_entropy_loss,
    "importance_sampling": importance_sampling_loss,
    "ppo": ppo_clip_loss,
}
