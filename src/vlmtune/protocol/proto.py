"""The protobuf messages the ``tinker`` client exchanges, as a small hand-written codec.

The client posts ``/api/v1/forward_backward`` as a ``tinker_public.ForwardBackwardRequest``
and wants ``ForwardBackwardOutput`` and ``SampleResponse`` results as protobuf
(``Accept: application/x-protobuf``). Those three messages are fixed and small, so a
wire-format codec here (field numbers from ``tinker_public.proto``) avoids making
``protobuf``, or the client package itself, a server dependency. The decoder returns
the same dict shape as the JSON API, so one validation path serves both.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# tinker_public.DType
_DTYPES: dict[int, tuple[str, str]] = {
    1: ("<f4", "float32"),
    2: ("<i8", "int64"),
    3: ("<i4", "int64"),
    4: ("<u2", "float32"),  # bfloat16: upper half of a float32
}
_DTYPE_FLOAT32 = 1


class ProtoError(ValueError):
    """The body is not a well-formed message of the expected type."""


# ---- decoding ------------------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtoError("varint longer than 10 bytes")


def _fields(buf: bytes) -> dict[int, list[Any]]:
    """Field number -> values in order (varints as int, everything else as bytes)."""
    if not isinstance(buf, bytes):  # a sub-message sent as a varint
        raise ProtoError("expected an embedded message, got a varint")
    out: dict[int, list[Any]] = {}
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise ProtoError("field number 0")
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > n:
                raise ProtoError("truncated fixed-width field")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > n:
                raise ProtoError(f"field {num}: length {size} runs past the end")
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        out.setdefault(num, []).append(value)
    return out


def _last(fields: dict[int, list[Any]], num: int, kind: type, default: Any = None) -> Any:
    values = fields.get(num)
    if not values:
        return default
    value = values[-1]
    if not isinstance(value, kind):
        raise ProtoError(f"field {num} has the wrong wire type")
    return value


def _str(fields: dict[int, list[Any]], num: int, default: str = "") -> str:
    raw = _last(fields, num, bytes)
    if raw is None:
        return default
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtoError(f"field {num} is not UTF-8") from None


def _f64(raw: bytes) -> float:
    if len(raw) != 8:  # a double sent with the wrong wire type
        raise ProtoError(f"expected an 8-byte double, got {len(raw)} bytes")
    return float(struct.unpack("<d", raw)[0])


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _packed_int64(values: list[Any]) -> list[int]:
    out: list[int] = []
    for v in values:
        if isinstance(v, int):
            out.append(_int32(v))
            continue
        pos = 0
        while pos < len(v):
            x, pos = _varint(v, pos)
            out.append(_int32(x))
    return out


def _array(raw: bytes, dtype_code: int) -> np.ndarray:
    np_dtype, _ = _DTYPES[dtype_code]
    if len(raw) % np.dtype(np_dtype).itemsize:
        raise ProtoError("tensor bytes are not a whole number of elements")
    arr = np.frombuffer(raw, dtype=np_dtype)
    if dtype_code == 4:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _tensor(buf: bytes) -> dict[str, Any]:
    f = _fields(buf)
    code = _last(f, 3, int, 0)
    if code not in _DTYPES:
        raise ProtoError(f"unsupported tensor dtype {code}")
    out: dict[str, Any] = {"dtype": _DTYPES[code][1], "shape": _packed_int64(f.get(4, [])) or None}
    sparse = _last(f, 2, bytes)
    if sparse is not None:
        s = _fields(sparse)
        out["data"] = _array(_last(s, 1, bytes, b""), code).tolist()
        out["sparse_crow_indices"] = _array(_last(s, 2, bytes, b""), 2).tolist()
        out["sparse_col_indices"] = _array(_last(s, 3, bytes, b""), 2).tolist()
    else:
        out["data"] = _array(_last(f, 1, bytes, b""), code).tolist()
    return out


def _chunk(buf: bytes) -> dict[str, Any]:
    f = _fields(buf)
    if 1 in f:
        tokens = _last(_fields(_last(f, 1, bytes)), 1, bytes, b"")
        return {"type": "encoded_text", "tokens": _array(tokens, 3).tolist()}
    if 2 in f:
        img = _fields(_last(f, 2, bytes))
        expected = _last(img, 3, int)
        return {
            "type": "image",
            "data": _last(img, 1, bytes, b""),
            "format": _str(img, 2, "png"),
            "expected_tokens": None if expected is None else _int32(expected),
        }
    if 3 in f:
        raise ProtoError("audio (dmel) chunks are not supported by this server")
    raise ProtoError("empty model input chunk")


def _map(values: list[Any]) -> list[tuple[str, dict[int, list[Any]]]]:
    out = []
    for entry in values:
        f = _fields(entry)
        out.append((_str(f, 1), f))
    return out


def decode_forward_backward_request(body: bytes) -> dict[str, Any]:
    """``tinker_public.ForwardBackwardRequest`` -> the JSON API's request dict."""
    f = _fields(body)
    config: dict[str, float | str] = {}
    for key, entry in _map(f.get(5, [])):  # legacy map<string, double>
        raw = _last(entry, 2, bytes)
        config[key] = _f64(raw) if raw is not None else 0.0
    for key, entry in _map(f.get(7, [])):  # map<string, LossConfigValue>, preferred
        value = _fields(_last(entry, 2, bytes, b""))
        number = _last(value, 1, bytes)
        config[key] = _f64(number) if number is not None else _str(value, 2)
    data = []
    for raw in f.get(3, []):
        d = _fields(raw)
        data.append(
            {
                "model_input": {"chunks": [_chunk(c) for c in d.get(1, [])]},
                "loss_fn_inputs": {
                    key: _tensor(_last(entry, 2, bytes, b"")) for key, entry in _map(d.get(2, []))
                },
            }
        )
    seq_id = _last(f, 2, int)
    return {
        "model_id": _str(f, 1),
        "seq_id": None if seq_id is None else _int32(seq_id),
        "forward_only": bool(_last(f, 6, int, 0)),
        "forward_backward_input": {
            "data": data,
            "loss_fn": _str(f, 4),
            "loss_fn_config": config or None,
        },
    }


# ---- encoding ------------------------------------------------------------------------
def _enc_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len(num: int, payload: bytes) -> bytes:
    return _enc_varint(num << 3 | 2) + _enc_varint(len(payload)) + payload


def _vint(num: int, value: int) -> bytes:
    return _enc_varint(num << 3) + _enc_varint(value)


def _double(num: int, value: float) -> bytes:
    return _enc_varint(num << 3 | 1) + struct.pack("<d", value)


def encode_forward_backward_output(
    outputs: Sequence[Mapping[str, Sequence[float]]], metrics: Mapping[str, float]
) -> bytes:
    """Per-datum float outputs as one batched ``ArrayRecord``, plus the metrics."""
    record = bytearray(_len(1, b"") + _vint(3, len(outputs)))
    names = list(outputs[0]) if outputs else []
    for name in names:
        arrays = [np.asarray(o[name], dtype="<f4").reshape(-1) for o in outputs]
        offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype("<i8")
        tensor = (
            _len(1, b"".join(a.tobytes() for a in arrays))
            + _len(2, offsets.tobytes())
            + _vint(3, _DTYPE_FLOAT32)
        )
        record += _len(2, _len(1, name.encode()) + _len(2, tensor))
    out = bytearray(_len(1, b"ArrayRecord") + _len(2, bytes(record)))
    for key, value in metrics.items():
        out += _len(3, _len(1, key.encode()) + _double(2, float(value)))
    return bytes(out)


def encode_sample_response(
    sequences: Sequence[tuple[Sequence[int], Sequence[float] | None, str]],
    prompt_logprobs: Sequence[float | None] | None = None,
) -> bytes:
    """``(tokens, logprobs, stop_reason)`` per sequence; ``None`` prompt logprobs -> NaN."""
    out = bytearray()
    for tokens, logprobs, stop_reason in sequences:
        seq = _vint(1, 1 if stop_reason == "length" else 0) + _len(
            2, np.asarray(tokens, dtype="<i4").tobytes()
        )
        if logprobs is not None:
            seq += _len(3, np.asarray(logprobs, dtype="<f4").tobytes())
        out += _len(1, seq)
    if prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in prompt_logprobs]
        out += _len(2, np.asarray(values, dtype="<f4").tobytes())
    return bytes(out)
