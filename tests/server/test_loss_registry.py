"""Every consumer of a built-in loss reads ``losses.LOSSES``: one entry adds a loss.

A toy loss is registered for each test (``monkeypatch.setitem`` restores the registry):
the engine computes it, the server's validator accepts its inputs and config and
refuses missing ones, and the server's all-positions forward computes it too. An
unknown name gets the same message from all three.
"""

from __future__ import annotations

import pytest
import torch

from vlmtune.engine import losses
from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.protocol.bodies import FwdBwdInput
from vlmtune.protocol.errors import BadRequest
from vlmtune.server.inference import forward_all_positions
from vlmtune.server.validate import InputValidator
from vlmtune.types import Datum, EncodedTextChunk, ModelInput, TensorData

TOKENS = [11, 12, 13, 14, 15, 16]
MASK = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def masked_nll(
    logprobs_B_T: torch.Tensor, mask_B_T: torch.Tensor, scale: float = 1.0
) -> losses.LossOutput:
    """``-scale * sum(mask * logp)``: cross-entropy with its weights renamed, scaled."""
    loss = -scale * (mask_B_T * logprobs_B_T).sum()
    return loss, {"loss:sum": float(loss.detach()), "masked_tokens:sum": float(mask_B_T.sum())}


TOY = losses.LossSpec(
    masked_nll,
    ("mask",),
    positions="mask",
    options=(losses.LossOption("scale", ("scale", "toy_scale"), 1.0),),
)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(losses.LOSSES, "toy", TOY)


@pytest.fixture(scope="module")
def engine(tiny_dir) -> TrainingEngine:
    return TrainingEngine(EngineConfig(base_model=str(tiny_dir), mode="full", lora_rank=0))


def datum(**inputs: list[float]) -> Datum:
    tensors = {k: TensorData(data=v, dtype="float32") for k, v in inputs.items()}
    targets = TensorData(data=TOKENS[1:] + [0], dtype="int64")
    return Datum(
        model_input=ModelInput(chunks=[EncodedTextChunk(tokens=TOKENS)]),
        loss_fn_inputs={"target_tokens": targets, **tensors},
    )


def request(loss_fn: str, config: dict | None = None, **inputs: list[float]) -> FwdBwdInput:
    tensors = {k: {"data": v, "dtype": "float32"} for k, v in inputs.items()}
    wire_datum = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": TOKENS[1:] + [0], "dtype": "int64"},
            **tensors,
        },
    }
    body = {"data": [wire_datum], "loss_fn": loss_fn, "loss_fn_config": config}
    return FwdBwdInput.model_validate(body)


def test_engine_computes_a_registered_loss(toy, engine):
    """toy with scale 2 is twice cross-entropy weighted by the same mask, and log-probs
    are computed only where the mask is non-zero (the entry's ``positions``)."""
    ce = engine.forward([datum(weights=MASK)], "cross_entropy")
    out = engine.forward([datum(mask=MASK)], "toy", {"toy_scale": 2.0})
    assert out.metrics["loss:sum"] == pytest.approx(2 * ce.metrics["loss:sum"], rel=1e-6)
    assert out.metrics["masked_tokens:sum"] == 3.0
    lps = out.loss_fn_outputs[0]["logprobs"].data
    assert [x != 0 for x in lps] == [m != 0 for m in MASK]
    assert lps == pytest.approx(ce.loss_fn_outputs[0]["logprobs"].data)


def test_server_validator_accepts_the_loss_and_refuses_what_it_lacks(toy, tiny_dir):
    validator = InputValidator(tiny_dir, min_pixels=1024, max_pixels=4096)
    datums, config = validator.forward_backward(request("toy", {"scale": 2}, mask=MASK))
    assert config == {"scale": 2.0}
    assert datums[0].loss_fn_inputs["mask"].data == MASK
    with pytest.raises(BadRequest, match=r"loss 'toy' needs loss_fn_inputs \['mask'\]"):
        validator.forward_backward(request("toy", weights=MASK))
    with pytest.raises(BadRequest, match="unknown key 'clip_low' for toy"):
        validator.forward_backward(request("toy", {"clip_low": 0.1}, mask=MASK))


def test_server_forward_computes_the_loss_at_every_position(toy, engine):
    """The server's ``forward`` returns log-probs everywhere, and the same toy loss."""
    out = forward_all_positions(engine, [datum(mask=MASK)], "toy", {"scale": 2.0})
    reference = engine.forward([datum(mask=MASK)], "toy", {"scale": 2.0})
    assert out.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-6)
    assert all(x != 0 for x in out.loss_fn_outputs[0]["logprobs"].data[:-1])


def test_unknown_loss_is_refused_everywhere_with_one_message(engine, tiny_dir):
    message = "unknown loss_fn 'toy'; built-ins: ['cross_entropy', 'importance_sampling', 'ppo']"
    with pytest.raises(ValueError) as in_engine:
        engine.forward([datum(mask=MASK)], "toy")
    with pytest.raises(ValueError) as in_forward:
        forward_all_positions(engine, [datum(mask=MASK)], "toy", {})
    validator = InputValidator(tiny_dir, min_pixels=1024, max_pixels=4096)
    with pytest.raises(BadRequest) as in_validator:
        validator.forward_backward(request("toy", mask=MASK))
    assert str(in_engine.value) == str(in_forward.value) == str(in_validator.value) == message
    # Unregistered, the toy's input is no known input either.
    with pytest.raises(BadRequest, match=r"unknown loss_fn_inputs \['mask'\]"):
        validator.forward_backward(request("cross_entropy", mask=MASK))
