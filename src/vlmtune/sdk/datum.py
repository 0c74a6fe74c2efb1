"""Helpers to build a ``Datum`` from tokens and weights, or from chat messages."""

from __future__ import annotations

from collections.abc import Sequence

from vlmtune.types import Datum, ModelInput, TensorData


def datum_from_tokens_weights(tokens: Sequence[int], weights: Sequence[float]) -> Datum:
    """Next-token datum from a full token sequence and one weight per token.

    The input is ``tokens[:-1]``; position t predicts ``tokens[t+1]`` with weight
    ``weights[t+1]`` (Tinker's convention).
    """
    if len(tokens) != len(weights):
        raise ValueError(f"{len(tokens)} tokens but {len(weights)} weights")
    if len(tokens) < 2:
        raise ValueError("a datum needs at least two tokens")
    return Datum(
        model_input=ModelInput.from_ints(list(tokens[:-1])),
        loss_fn_inputs={
            "target_tokens": TensorData(data=list(tokens[1:]), dtype="int64"),
            "weights": TensorData(data=[float(w) for w in weights[1:]], dtype="float32"),
        },
    )


def scale_weights(datums: Sequence[Datum], factor: float) -> list[Datum]:
    """Copies of ``datums`` with ``weights`` multiplied by ``factor`` (for normalisation)."""
    out = []
    for d in datums:
        inputs = dict(d.loss_fn_inputs)
        w = inputs["weights"]
        inputs["weights"] = TensorData(
            data=[float(x) * factor for x in w.data], dtype="float32", shape=w.shape
        )
        out.append(Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    return out


def weighted_token_count(datums: Sequence[Datum]) -> int:
    return sum(sum(1 for x in d.loss_fn_inputs["weights"].data if x != 0) for d in datums)
