"""The hand-written protobuf codec agrees with the ``tinker`` client's own encoders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tinker import types as tt
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from vlmtune.protocol.proto import (
    ProtoError,
    decode_forward_backward_request,
    encode_forward_backward_output,
    encode_sample_response,
)


def test_forward_backward_request_decodes():
    weights = torch.zeros(2, 10)
    weights[0, 3] = 0.5
    datum = tt.Datum(
        model_input=tt.ModelInput(
            chunks=[
                tt.EncodedTextChunk(tokens=[1, 2]),
                tt.ImageChunk(data=b"\x89PNG...", format="png", expected_tokens=4),
                tt.EncodedTextChunk(tokens=[151643]),
            ]
        ),  # fmt: skip
        loss_fn_inputs={"target_tokens": np.array([2, 3, 4], dtype=np.int64), "weights": weights},
    )
    request = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(
            data=[datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.1}
        ),
        model_id="sess-a:train:0",
        seq_id=7,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = True
    out = decode_forward_backward_request(msg.SerializeToString())
    assert out["model_id"] == "sess-a:train:0" and out["seq_id"] == 7 and out["forward_only"]
    fbi = out["forward_backward_input"]
    assert fbi["loss_fn"] == "ppo" and fbi["loss_fn_config"] == {
        "clip_low_threshold": pytest.approx(0.1)
    }
    chunks = fbi["data"][0]["model_input"]["chunks"]
    assert chunks[0] == {"type": "encoded_text", "tokens": [1, 2]}
    assert chunks[1] == {
        "type": "image",
        "data": b"\x89PNG...",
        "format": "png",
        "expected_tokens": 4,
    }
    inputs = fbi["data"][0]["loss_fn_inputs"]
    assert (
        inputs["target_tokens"]["data"] == [2, 3, 4] and inputs["target_tokens"]["dtype"] == "int64"
    )
    w = inputs["weights"]  # a 2-D tensor the client sent as sparse CSR
    assert w["shape"] == [2, 10] and w["data"] == [0.5]
    assert w["sparse_crow_indices"] == [0, 1, 1] and w["sparse_col_indices"] == [3]


def test_outputs_decode_with_the_client():
    raw = encode_forward_backward_output(
        [{"logprobs": [-1.0, -2.0]}, {"logprobs": [-0.5]}], {"loss:sum": 3.5}
    )
    out = deserialize_forward_backward_output(raw)
    assert out.metrics == {"loss:sum": 3.5}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-1.0, -2.0], [-0.5]]

    raw = encode_sample_response(
        [([5, 6], [-0.1, -0.2], "stop"), ([7], None, "length")], [None, -1.5]
    )
    sample = deserialize_sample_response(raw)
    assert [s.tokens for s in sample.sequences] == [[5, 6], [7]]
    assert [s.stop_reason for s in sample.sequences] == ["stop", "length"]
    assert sample.sequences[0].logprobs == pytest.approx([-0.1, -0.2])
    assert sample.prompt_logprobs[0] is None and math.isclose(sample.prompt_logprobs[1], -1.5)


def test_garbage_is_a_proto_error():
    for body in (b"\xff\xff\xff", b"\x1a\x05ab", b"\x0f"):
        with pytest.raises(ProtoError):
            decode_forward_backward_request(body)
