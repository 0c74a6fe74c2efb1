"""The wire shapes are one definition: what the SDK writes is what the server reads."""

from __future__ import annotations

import math

import pytest

from vlmtune.protocol.bodies import ForwardBackwardBody, forward_backward_body
from vlmtune.protocol.errors import BadRequest
from vlmtune.protocol.paths import (
    checkpoint_id,
    checkpoint_name,
    is_tinker_path,
    parse_tinker_path,
    tinker_path,
)
from vlmtune.protocol.wire import (
    WireImage,
    WireModelInput,
    WireText,
    forward_backward_from_json,
    forward_backward_json,
    parse_body,
    sample_from_json,
    sample_json,
)
from vlmtune.types import (
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ImageChunk,
    ModelInput,
    SampledSequence,
    SampleResponse,
    TensorData,
)


def _datum() -> Datum:
    chunks = [EncodedTextChunk(tokens=[5, 6]), ImageChunk(data=b"\x89PNG\x00\xff", format="png",
              expected_tokens=4), EncodedTextChunk(tokens=[7])]  # fmt: skip
    return Datum(
        model_input=ModelInput(chunks=chunks),
        loss_fn_inputs={
            "target_tokens": TensorData(data=[6, 0, 0, 0, 0, 7, 1], dtype="int64"),
            "weights": TensorData(data=[1.0, 0, 0, 0, 0, 0.5, math.nan], dtype="float32"),
        },
    )


def test_what_the_sdk_writes_the_server_reads():
    body = forward_backward_body([_datum()], "importance_sampling", {"x": 1.0}, forward_only=True)
    parsed = parse_body({"model_id": "m", **body}, ForwardBackwardBody)
    assert parsed.forward_only and parsed.forward_backward_input.loss_fn == "importance_sampling"
    (wire,) = parsed.forward_backward_input.data
    text, image, last = wire.model_input.chunks
    assert isinstance(text, WireText) and text.tokens == [5, 6]
    assert isinstance(image, WireImage) and image.data == b"\x89PNG\x00\xff"  # bytes via base64
    assert image.expected_tokens == 4 and isinstance(last, WireText)
    assert wire.loss_fn_inputs["target_tokens"].flat("t").tolist() == [6, 0, 0, 0, 0, 7, 1]
    with pytest.raises(BadRequest, match="NaN"):  # reaches the server, which says why
        wire.loss_fn_inputs["weights"].flat("weights")


def test_a_prompt_round_trips():
    prompt = _datum().model_input
    again = parse_body(WireModelInput.of(prompt).model_dump(), WireModelInput)
    assert again == WireModelInput.of(prompt)


def test_results_round_trip():
    out = ForwardBackwardOutput(
        loss_fn_outputs=[{"logprobs": TensorData(data=[-0.5, -1.0], dtype="float32")}],
        metrics={"loss:sum": 1.5, "clip_frac": 0.25},
    )
    back = forward_backward_from_json(forward_backward_json(out))
    assert back.loss_fn_outputs == out.loss_fn_outputs
    assert back.metrics == {"loss:sum": 1.5, "clip_frac:mean": 0.25}  # Tinker's metric names
    response = SampleResponse(
        sequences=[SampledSequence(tokens=[1, 2], logprobs=[-0.1, -0.2], stop_reason="length")],
        prompt_logprobs=[None, -0.3],
    )
    assert sample_from_json(sample_json(response)) == response


def test_tinker_paths_are_one_table():
    path = tinker_path("sess:train:0", "sampler", "final")
    assert path == "tinker://sess:train:0/sampler_weights/final" and is_tinker_path(path)
    assert parse_tinker_path(path) == ("sess:train:0", "sampler", "final")
    assert parse_tinker_path(tinker_path("r", "training", "s")) == ("r", "training", "s")
    assert checkpoint_id("training", "s") == "weights/s"
    assert checkpoint_name("sampler_weights/final", "sampler") == "final"
    assert checkpoint_name("final", "sampler") == "final"
    for bad in ("tinker://r/weights", "tinker://r/other/x", "r/weights/x"):
        with pytest.raises(BadRequest, match="malformed checkpoint path"):
            parse_tinker_path(bad)
