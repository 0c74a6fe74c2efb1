"""Built-in losses on a collated batch, and the per-datum outputs and metrics of a call.

Stateless helpers of the engine: which positions a loss needs log-probabilities for,
which pure loss function (``losses.py``) a name selects, and how results are cut back
into one output per datum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmtune.engine import losses
from vlmtune.engine.batching import Batch
from vlmtune.types import Datum, TensorData


def check_input_present(datums: Sequence[Datum], key: str) -> None:
    """A ValueError naming the first datum that lacks ``loss_fn_inputs[key]``."""
    for i, d in enumerate(datums):
        if key not in d.loss_fn_inputs:
            have = ", ".join(sorted(d.loss_fn_inputs)) or "none"
            raise ValueError(f"datum {i} has no loss_fn_inputs[{key!r}] (it has: {have})")


def needed_positions(batch: Batch, loss_fn: str) -> torch.Tensor:
    if loss_fn == "cross_entropy":
        return batch.loss_inputs["weights"] != 0
    if loss_fn in ("importance_sampling", "ppo"):
        return batch.loss_inputs["advantages"] != 0
    return batch.attention_mask_B_T.bool()


def builtin_loss(
    batch: Batch, logprobs_B_T: torch.Tensor, loss_fn: str, config: dict[str, float]
) -> tuple[torch.Tensor, dict[str, float]]:
    li = batch.loss_inputs
    if loss_fn == "cross_entropy":
        return losses.cross_entropy_loss(logprobs_B_T, li["weights"])
    if loss_fn == "importance_sampling":
        return losses.importance_sampling_loss(logprobs_B_T, li["logprobs"], li["advantages"])
    if loss_fn == "ppo":
        return losses.ppo_clip_loss(
            logprobs_B_T,
            li["logprobs"],
            li["advantages"],
            clip_low=float(config.get("clip_low_threshold", config.get("clip_low", 0.2))),
            clip_high=float(config.get("clip_high_threshold", config.get("clip_high", 0.2))),
        )
    raise ValueError(f"unknown loss_fn {loss_fn!r}; built-ins: {sorted(losses.BUILTIN_LOSSES)}")


def per_datum(batch: Batch, values_B_T: torch.Tensor) -> list[torch.Tensor]:
    return [values_B_T[b, start : start + n] for b, start, n in batch.segments]


def as_outputs(per_datum: list[torch.Tensor]) -> list[dict[str, TensorData]]:
    return [
        {
            "logprobs": TensorData(
                data=t.detach().float().cpu().tolist(), dtype="float32", shape=[t.numel()]
            )
        }
        for t in per_datum
    ]


def merge_metrics(into: dict[str, float], new: dict[str, float]) -> None:
    """Combine micro-batch metrics by the reduction their name carries (``:sum``, ``:mean``)."""
    for k, v in new.items():
        if k not in into:
            into[k] = v
        elif k.endswith(":sum"):
            into[k] += v
        elif k.endswith(":max"):
            into[k] = max(into[k], v)
        else:  # means of micro-batch means: good enough for reporting
            into[k] = (into[k] + v) / 2
