"""Built-in losses on a collated batch, and the per-datum outputs and metrics of a call.

Stateless helpers of the engine: which positions a loss needs log-probabilities for,
which pure loss function a name selects (through ``losses.LOSSES``), how results are
cut back into one output per datum, and how micro-batches' and ranks' metrics combine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def _input(batch: Batch, key: str, loss_fn: str) -> torch.Tensor:
    if key not in batch.loss_inputs:
        have = ", ".join(sorted(batch.loss_inputs)) or "none"
        raise ValueError(f"loss {loss_fn!r} needs loss_fn_inputs[{key!r}] (the batch has: {have})")
    return batch.loss_inputs[key]


def needed_positions(batch: Batch, loss_fn: str) -> torch.Tensor:
    """Where the loss reads log-probs: the non-zero entries of its registry's ``positions``."""
    return _input(batch, losses.loss_spec(loss_fn).positions, loss_fn) != 0


def builtin_loss(
    batch: Batch, logprobs_B_T: torch.Tensor, loss_fn: str, config: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, float]]:
    spec = losses.loss_spec(loss_fn)
    inputs = {k: _input(batch, k, loss_fn) for k in spec.inputs}
    return spec(logprobs_B_T, inputs, config)


def per_datum(batch: Batch, values_B_T: torch.Tensor) -> list[torch.Tensor]:
    return [values_B_T[b, start : start + n] for b, start, n in batch.segments]


def filled(per_datum: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Every datum's log-probs, once all are in (a gap would be a bug in the rank split)."""
    missing = [i for i, t in enumerate(per_datum) if t is None]
    if missing:
        raise RuntimeError(f"no log-probs were computed for datum(s) {missing}")
    return [t for t in per_datum if t is not None]


def as_outputs(per_datum: list[torch.Tensor]) -> list[dict[str, TensorData]]:
    return [
        {
            "logprobs": TensorData(
                data=t.detach().float().cpu().tolist(), dtype="float32", shape=[t.numel()]
            )
        }
        for t in per_datum
    ]


# ---- metrics ----------------------------------------------------------------------------
# A metric's reduction is its name's suffix: ``:sum`` adds, ``:max`` keeps the largest, and
# anything else is a mean. Means travel as (sum, count) so that merging micro-batches, then
# ranks, gives the mean of all the parts, whatever way they were grouped.
MetricTotals = dict[str, tuple[float, int]]
"""Metric name -> (sum of the parts' values, or their max; number of parts)."""


def add_metrics(totals: MetricTotals, metrics: Mapping[str, float]) -> None:
    """Count one part's metrics (a micro-batch's, a datum's) into ``totals``."""
    merge_metrics(totals, {k: (float(v), 1) for k, v in metrics.items()})


def merge_metrics(into: MetricTotals, new: MetricTotals) -> None:
    """Combine two sets of totals (e.g. two ranks'), each metric by its reduction."""
    for k, (v, n) in new.items():
        if k not in into:
            into[k] = (v, n)
        elif k.endswith(":max"):
            into[k] = (max(into[k][0], v), into[k][1] + n)
        else:
            into[k] = (into[k][0] + v, into[k][1] + n)


def final_metrics(totals: MetricTotals) -> dict[str, float]:
    """The reported values: sums and maxima as they are, means divided by their count."""
    return {k: v if k.endswith((":sum", ":max")) else v / n for k, (v, n) in totals.items()}
