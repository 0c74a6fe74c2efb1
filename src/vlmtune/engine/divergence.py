"""A diverging run stops: non-finite losses, gradients and weights are refused.

The engine refuses to *apply* an optimizer step whose gradient norm is not finite
(the weights stay as the last finite step left them) and to *save* servable weights
that are not finite; a recipe turns either into a message naming the step, the
likely cause and the last good checkpoint (``recipes.common.stop_on_divergence``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist


class DivergedError(RuntimeError):
    """Training produced a non-finite value; nothing non-finite was applied or saved."""


def non_finite(**values: float | None) -> list[str]:
    """``"loss is nan"`` for each of ``values`` that is a number but not a finite one."""
    return [f"{k} is {v}" for k, v in values.items() if v is not None and not math.isfinite(v)]


def check_finite(**values: float | None) -> None:
    """Raise ``DivergedError`` naming every non-finite value (``loss=..., grad_norm=...``)."""
    bad = non_finite(**values)
    if bad:
        raise DivergedError(", ".join(bad))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's values of ``t``: its shard when FSDP made it a DTensor."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite, on every rank (collective under
    torchrun: ranks hold different shards, and must agree, or one would stop alone
    while the others wait for it in the next collective)."""
    # One device sync for all tensors, not one per tensor (hundreds of LoRA matrices).
    checks = [torch.isfinite(_local(t)).all() for t in tensors if t.is_floating_point()]
    ok = bool(torch.stack(checks).all()) if checks else True
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(ok)], device=_flag_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def check_weights_finite(params: Iterable[torch.Tensor], path: object) -> None:
    """Refuse to save ``params`` anywhere (``path``) unless every value is finite."""
    if not all_finite(params):  # collective: every rank agrees
        raise DivergedError(f"{path}: not saved: the trained weights are not finite")


def _flag_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
