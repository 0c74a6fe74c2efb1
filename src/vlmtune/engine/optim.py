"""The optimizer step: AdamW with per-call hyperparameters and global-norm clipping."""

from __future__ import annotations

import math

import torch

from vlmtune.engine.distributed import total_norm_value
from vlmtune.engine.divergence import DivergedError
from vlmtune.types import AdamParams


def new_adamw(params: list[torch.nn.Parameter], learning_rate: float) -> torch.optim.AdamW:
    # fused: one kernel per parameter, no parameter-sized temporaries (foreach makes
    # several, e.g. sqrt of every second moment at once: +83 MiB for the tiny model
    # fully trained); on the CPU 4.7x faster than foreach over its 21.7M parameters.
    return torch.optim.AdamW(params, lr=learning_rate, fused=True)


def clip_and_step(
    optimizer: torch.optim.AdamW,
    params: list[torch.nn.Parameter],
    hp: AdamParams,
    device: torch.device,
) -> float:
    """Set this call's hyperparameters, clip to ``hp.grad_clip_norm`` (0: no clipping),
    step and zero the grads; returns the gradient norm before clipping.

    Under FSDP the norm of sharded grads is a DTensor over all ranks' shards; it is made
    a full tensor before clipping, so every rank scales by the same global norm.

    A non-finite norm (the loss or a gradient overflowed) is refused: the grads are
    zeroed, the weights and the optimizer's moments stay as they were, and
    ``DivergedError`` is raised on every rank (the norm is global, so all agree).
    """
    for group in optimizer.param_groups:
        group.update(
            lr=hp.learning_rate,
            betas=(hp.beta1, hp.beta2),
            eps=hp.eps,
            weight_decay=hp.weight_decay,
        )
    max_norm = hp.grad_clip_norm if hp.grad_clip_norm > 0 else float("inf")
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = total_norm_value(torch.nn.utils.get_total_norm(grads))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise DivergedError(f"grad_norm is {grad_norm}; the optimizer step was not applied")
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(grad_norm, device=device))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
