"""The wire decoders answer any input with a model or their own client error.

``parse_body`` (JSON bytes or a decoded dict), the protobuf decoder, and the methods
the routes call on a decoded body (``flat``, ``to_adam``, ``to_params``...) either
succeed or raise ``BadRequest`` / ``ProtoError``: anything else would be a 500.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinker import types as tt
from tinker.proto.request_conv import forward_backward_request_to_proto

from vlmtune.protocol.bodies import (
    CreateModelBody,
    CreateSessionBody,
    ForwardBackwardBody,
    LoadWeightsBody,
    OptimStepBody,
    RetrieveBody,
    SampleBody,
    SamplingSessionBody,
    SaveSamplerBody,
    SaveWeightsBody,
)
from vlmtune.protocol.errors import BadRequest
from vlmtune.protocol.proto import ProtoError, _enc_varint, decode_forward_backward_request
from vlmtune.protocol.wire import WireModel, parse_body
from vlmtune.server.routes.jobs import PromoteBody, TomlJobBody, TrainerJobBody
from vlmtune.server.routes.openai import ChatBody

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
BODIES: list[type[WireModel]] = [
    CreateModelBody, CreateSessionBody, ForwardBackwardBody, LoadWeightsBody, OptimStepBody,
    RetrieveBody, SampleBody, SamplingSessionBody, SaveSamplerBody, SaveWeightsBody,
    PromoteBody, TomlJobBody, TrainerJobBody, ChatBody,
]  # fmt: skip

# Strings as JSON can carry them: lone surrogates included (``"\ud800"`` decodes to one).
strings = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from(["model_id", "data", "tokens", "image", "encoded_text", "int64", "float32"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities included
    strings,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(strings, inner, max_size=4)
    ),
    max_leaves=30,
)


def _use(body: WireModel) -> None:
    """What routes call on a decoded body before any engine runs."""
    if isinstance(body, ForwardBackwardBody):
        for i, datum in enumerate(body.forward_backward_input.data):
            for key, tensor in datum.loss_fn_inputs.items():
                tensor.flat(f"data[{i}].{key}")
    elif isinstance(body, OptimStepBody):
        body.params()
    elif isinstance(body, SampleBody):
        body.check_supported()
        body.sampling_params.to_params()


def _decodes_or_refuses(raw: bytes | dict[str, Any], model: type[WireModel]) -> None:
    try:
        body = parse_body(raw, model)
    except BadRequest:
        return
    assert isinstance(body, model)
    with contextlib.suppress(BadRequest):
        _use(body)


@FUZZ
@given(raw=st.binary(max_size=200), model=st.sampled_from(BODIES))
def test_any_bytes(raw, model):
    _decodes_or_refuses(raw, model)


@FUZZ
@given(value=json_values, model=st.sampled_from(BODIES))
def test_any_json(value, model):
    # As the bytes a client sends (NaN as Python writes it) and as a decoded dict.
    _decodes_or_refuses(json.dumps(value).encode(), model)
    if isinstance(value, dict):
        _decodes_or_refuses(value, model)


def _good_forward_backward() -> dict[str, Any]:
    return {
        "model_id": "sess-a:train:0",
        "seq_id": 1,
        "forward_backward_input": {
            "loss_fn": "cross_entropy",
            "data": [
                {
                    "model_input": {
                        "chunks": [
                            {"type": "encoded_text", "tokens": [1, 2, 3]},
                            {"type": "image", "data": "iVBORw0KGgo=", "expected_tokens": 4},
                        ]
                    },
                    "loss_fn_inputs": {
                        "target_tokens": {"data": [2, 3, 4, 5], "dtype": "int64"},
                        "weights": {
                            "data": [0.5],
                            "dtype": "float32",
                            "shape": [4, 1],
                            "sparse_crow_indices": [0, 0, 1, 1, 1],
                            "sparse_col_indices": [0],
                        },
                    },
                }
            ],
        },
    }


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


GOOD = _good_forward_backward()
GOOD_PATHS = _paths(GOOD)[1:]


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    if not isinstance(value, list | dict):
        raise TypeError("the path runs through a leaf an earlier edit put there")
    copy = list(value) if isinstance(value, list) else dict(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def test_the_good_body_decodes():
    body = parse_body(json.dumps(GOOD).encode(), ForwardBackwardBody)
    weights = body.forward_backward_input.data[0].loss_fn_inputs["weights"].flat("w")
    assert weights.tolist() == [0.0, 0.5, 0.0, 0.0]


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(GOOD_PATHS), json_values), min_size=1, max_size=3))
def test_near_valid_forward_backward(edits):
    # One to three leaves or subtrees of a valid body replaced: the values reach the
    # checks behind the shape checks (sparse indices, shapes, dtypes).
    body = GOOD
    for path, new in edits:
        with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier edit
            body = _replaced(body, path, new)  # removed that path
    _decodes_or_refuses(json.dumps(body).encode(), ForwardBackwardBody)


def _proto_message() -> bytes:
    weights = np.zeros((2, 10), dtype=np.float32)
    weights[0, 3] = 0.5
    datum = tt.Datum(
        model_input=tt.ModelInput(
            chunks=[
                tt.EncodedTextChunk(tokens=[1, 2]),
                tt.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4),
            ]
        ),
        loss_fn_inputs={"target_tokens": np.array([2, 3], dtype=np.int64), "weights": weights},
    )
    request = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(
            data=[datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.1}
        ),
        model_id="sess-a:train:0",
        seq_id=7,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


PROTO = _proto_message()


def _proto_decodes_or_refuses(raw: bytes) -> None:
    try:
        decoded = decode_forward_backward_request(raw)
    except ProtoError:
        return
    _decodes_or_refuses(decoded, ForwardBackwardBody)


def _encode(fields: list[tuple[int, int, Any]]) -> bytes:
    out = b""
    for number, wire, value in fields:
        out += _enc_varint(number << 3 | wire)
        if wire == 0:
            out += _enc_varint(value)
        elif wire in (1, 5):
            out += value
        else:
            payload = value if isinstance(value, bytes) else _encode(value)
            out += _enc_varint(len(payload)) + payload
    return out


# Messages shaped like protobuf at every level (any field number, wire type and
# nesting): they get past the tokenizer and into the decoder's field handling.
proto_fields = st.recursive(
    st.lists(
        st.one_of(
            st.tuples(st.integers(1, 8), st.just(0), st.integers(0, 2**64 - 1)),
            st.tuples(st.integers(1, 8), st.just(1), st.binary(min_size=8, max_size=8)),
            st.tuples(st.integers(1, 8), st.just(5), st.binary(min_size=4, max_size=4)),
            st.tuples(st.integers(1, 8), st.just(2), st.binary(max_size=24)),
        ),
        max_size=5,
    ),
    lambda inner: st.lists(
        st.one_of(inner.map(lambda f: (1, 2, f)), st.tuples(st.integers(1, 8), st.just(2), inner)),
        max_size=4,
    ),
    max_leaves=20,
)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_any_protobuf_bytes(raw):
    _proto_decodes_or_refuses(raw)


@settings(FUZZ, max_examples=1000)  # cheap, and the space of shapes is large
@given(fields=proto_fields)
def test_any_protobuf_message(fields):
    _proto_decodes_or_refuses(_encode(fields))


@FUZZ
@given(
    at=st.integers(0, len(PROTO) - 1),
    new=st.binary(min_size=1, max_size=4),
    cut=st.integers(0, len(PROTO)),
    mode=st.sampled_from(["replace", "insert", "truncate"]),
)
def test_corrupted_protobuf(at, new, cut, mode):
    # A real client message with a few bytes changed: field numbers, wire types and
    # lengths that almost parse.
    if mode == "replace":
        raw = PROTO[:at] + new + PROTO[at + len(new) :]
    elif mode == "insert":
        raw = PROTO[:at] + new + PROTO[at:]
    else:
        raw = PROTO[:cut]
    _proto_decodes_or_refuses(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"model_id": "\\ud800"}', "lone UTF-16 surrogate"),
        (b'{"model_id": "\xed\xa0\x80"}', "lone UTF-16 surrogate"),  # raw surrogate bytes
        (b'{"\\udfff": 1, "model_id": "x"}', "lone UTF-16 surrogate"),
        (b'{"model_id": "x", "seq_id": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"model_id": "x", "a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper"),
        (b'{"model_id": "x", "seq_id": 9223372036854775808}', "seq_id"),
    ],
)
def test_edge_bodies_are_named_client_errors(raw, expected):
    with pytest.raises(BadRequest, match=expected):
        parse_body(raw, OptimStepBody)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"sparse_crow_indices": [0, 5, 1, 1, 1]}, "inconsistent sparse"),  # ran off col[]
        ({"sparse_crow_indices": [-1, 0, 1, 1, 1]}, "inconsistent sparse"),  # wrapped around
        ({"shape": [2**24, 2**24], "sparse_crow_indices": [0, 1]}, "exceeds"),  # no 2**48 alloc
        ({"shape": [2**22, 2**22, 2**20], "sparse_crow_indices": None}, "exceeds"),  # 2**64 wraps
        ({"shape": [2**63]}, "shape"),
    ],
)
def test_edge_tensors_are_named_client_errors(weights, expected):
    body = _replaced(GOOD, ("forward_backward_input", "data", 0, "loss_fn_inputs", "weights"),
                     {**GOOD["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"],
                      **weights})  # fmt: skip
    with pytest.raises(BadRequest, match=expected):
        _use(parse_body(json.dumps(body).encode(), ForwardBackwardBody))


def test_a_valid_surrogate_pair_is_text():
    # An astral character escaped as a UTF-16 pair is one valid character, not a surrogate.
    body = parse_body(b'{"model_id": "\\ud83d\\ude00"}', OptimStepBody)
    assert body.model_id == "\U0001f600" and not math.isnan(len(body.model_id))
