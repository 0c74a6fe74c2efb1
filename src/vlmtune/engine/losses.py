"""Losses as pure functions of per-token log-probabilities.

Every function takes padded ``(B, T)`` tensors whose padding positions carry zero
weight/advantage, returns a scalar loss to *sum* into the gradient (no hidden mean:
callers normalise through the weights they pass, so gradient accumulation and data
parallelism compose exactly), and a dict of float metrics.

Built-in loss names follow the hosted training SDKs (Tinker): ``cross_entropy``,
``importance_sampling``, ``ppo``. ``LOSSES`` (at the end) is the only list of them: the
engine, the server's validator and its forward read each loss's entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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


# A DPO margin within this fraction of its inputs' scale (the four summed log-probs'
# magnitudes) is a tie. With the policy equal to the reference (step 1), forward passes
# that pack the same pairs differently gave margins of up to 1.4 float32 ulps of that
# scale in fp32 and 0.23 bfloat16 ulps in bf16 (256 digits pairs, CPU): the sign of such
# a margin is noise. Each tolerance sits well above its compute dtype's noise.
TIE_RTOL: dict[str, float] = {
    "fp32": 64 * torch.finfo(torch.float32).eps,
    "bf16": torch.finfo(torch.bfloat16).eps,
}


def reward_accuracy(
    margin_P: torch.Tensor, scale_P: torch.Tensor, beta: float, tie_rtol: float
) -> tuple[float, float]:
    """(accuracy, tie fraction) of P DPO margins: a win counts 1, a tie 0.5, a loss 0.

    A tie is ``|margin| <= beta * tie_rtol * scale``, ``scale`` being the sum of the
    magnitudes of the four summed log-probs the margin is computed from. Ties count a
    half (TRL counts them as losses) so that a policy that cannot tell the sides apart,
    e.g. at step 1, reads 0.5, chance, not a number set by the sign of float noise.
    """
    ties_P = margin_P.abs() <= beta * tie_rtol * scale_P
    wins_P = (margin_P > 0) & ~ties_P
    accuracy = float((wins_P.float() + 0.5 * ties_P.float()).mean())
    return accuracy, float(ties_P.float().mean())


def dpo_loss(
    policy_chosen_logps_P: torch.Tensor,
    policy_rejected_logps_P: torch.Tensor,
    reference_chosen_logps_P: torch.Tensor,
    reference_rejected_logps_P: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    tie_rtol: float = TIE_RTOL["fp32"],
) -> LossOutput:
    """Sigmoid DPO loss (Rafailov et al. 2023, eq. 7), mean over pairs.

    With ``h = beta * ((pi_c - ref_c) - (pi_r - ref_r))`` on summed response
    log-probabilities, ``loss = -(1 - eps) * logsigmoid(h) - eps * logsigmoid(-h)``
    (conservative DPO when ``eps = label_smoothing > 0``). ``tie_rtol``: see
    ``reward_accuracy`` (``TIE_RTOL`` of the dtype the log-probs were computed in).
    """
    chosen_rewards_P = beta * (policy_chosen_logps_P - reference_chosen_logps_P)
    rejected_rewards_P = beta * (policy_rejected_logps_P - reference_rejected_logps_P)
    margin_P = chosen_rewards_P - rejected_rewards_P
    losses_P = -(1 - label_smoothing) * F.logsigmoid(margin_P) - label_smoothing * F.logsigmoid(
        -margin_P
    )
    loss = losses_P.mean()
    logps_4_P = torch.stack(
        [
            policy_chosen_logps_P,
            policy_rejected_logps_P,
            reference_chosen_logps_P,
            reference_rejected_logps_P,
        ]
    ).detach()
    accuracy, ties = reward_accuracy(margin_P.detach(), logps_4_P.abs().sum(0), beta, tie_rtol)
    metrics = {
        "dpo_loss": float(loss.detach()),
        "reward_accuracy": accuracy,
        "reward_ties": ties,
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


# ---- the registry: the one place that knows each built-in loss -------------------------
@dataclass(frozen=True)
class LossOption:
    """One number a loss reads from ``loss_fn_config``."""

    kwarg: str  # the loss function's keyword argument it sets
    keys: tuple[str, ...]  # config keys that set it, the first present wins (Tinker's first)
    default: float  # its value when no key is given

    def value(self, config: Mapping[str, float]) -> float:
        return next((float(config[k]) for k in self.keys if k in config), self.default)


@dataclass(frozen=True)
class LossSpec:
    """What the engine and the server need to know about one built-in loss.

    The loss is ``fn(logprobs_B_T, *(inputs[k] for k in self.inputs), **kwargs(config))``
    on ``(B, T)`` tensors of the named ``loss_fn_inputs``.
    """

    fn: Callable[..., LossOutput]
    inputs: tuple[str, ...]  # loss_fn_inputs passed after the log-probs, in this order
    positions: str  # the input whose non-zero entries are the positions needing log-probs
    # Inputs a request may omit, and the constant a server fills them with (per position).
    fill: Mapping[str, float] = field(default_factory=dict)
    options: tuple[LossOption, ...] = ()

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """What a datum must carry: the targets, and every input without a fill value."""
        return ("target_tokens", *(k for k in self.inputs if k not in self.fill))

    @property
    def config_keys(self) -> tuple[str, ...]:
        return tuple(k for o in self.options for k in o.keys)

    def kwargs(self, config: Mapping[str, float]) -> dict[str, float]:
        return {o.kwarg: o.value(config) for o in self.options}

    def __call__(
        self,
        logprobs_B_T: torch.Tensor,
        inputs: Mapping[str, torch.Tensor],
        config: Mapping[str, float],
    ) -> LossOutput:
        return self.fn(logprobs_B_T, *(inputs[k] for k in self.inputs), **self.kwargs(config))


_CLIP = (
    LossOption("clip_low", ("clip_low_threshold", "clip_low"), 0.2),
    LossOption("clip_high", ("clip_high_threshold", "clip_high"), 0.2),
)

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(
        cross_entropy_loss, ("weights",), positions="weights", fill={"weights": 1.0}
    ),
    "importance_sampling": LossSpec(
        importance_sampling_loss, ("logprobs", "advantages"), positions="advantages"
    ),
    "ppo": LossSpec(
        ppo_clip_loss, ("logprobs", "advantages"), positions="advantages", options=_CLIP
    ),
}
"""Built-in losses by the name a request gives (Tinker's names); adding one is one entry."""


def loss_spec(name: str) -> LossSpec:
    """The registry entry for ``name``; unknown names get the same message everywhere."""
    spec = LOSSES.get(name)
    if spec is None:
        raise ValueError(f"unknown loss_fn {name!r}; built-ins: {sorted(LOSSES)}")
    return spec


# A 0/1 per-position mask any loss accepts (the Fireworks cookbook's RL data carry it):
# the server multiplies it into the loss's ``positions`` input, then drops it.
MASK_INPUT = "loss_mask"


def known_inputs() -> tuple[str, ...]:
    """Every ``loss_fn_inputs`` key some built-in loss reads, targets first."""
    keys = dict.fromkeys(["target_tokens", *(k for s in LOSSES.values() for k in s.inputs)])
    return tuple(keys)
