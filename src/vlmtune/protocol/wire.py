"""JSON shapes on the wire, as pydantic models, and the SDK's encoders for them.

The server reads request bodies through these models (they also take the dicts
``proto.py`` decodes, and ignore fields this server does not use); shape and type
errors become one ``BadRequest`` naming every field at fault, and the server's
``validate.py`` then checks the content against the run's model. The SDK writes its
requests with ``WireDatum.of`` and friends and reads results with the ``*_from_json``
functions, so each shape is spelled once, here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_serializer,
    field_validator,
)

from vlmtune.protocol.errors import BadRequest
from vlmtune.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ModelInput,
    SampleResponse,
    SamplingParams,
    TensorData,
)


class WireModel(BaseModel):
    """Base of every body: unknown fields are ignored (clients send more than we read)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


M = TypeVar("M", bound=WireModel)

INT64_MAX = 2**63 - 1
# What SQLite, numpy and torch can hold: an integer past it is a 400 at the edge, not
# an OverflowError deep inside.
Int64 = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]
SeqId = Annotated[int, Field(ge=0, le=INT64_MAX)]
# No request shape nests deeper than a few levels; user_metadata and engine overrides
# are free-form, and without a bound a deep one breaks json.dumps on its way to the store.
MAX_DEPTH = 32
# Values one loss input may unpack to (a sparse or shaped tensor is allocated densely).
MAX_TENSOR_VALUES = 1 << 24
_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = {int, float, bool, type(None)}


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _problem(value: Any) -> str | None:
    """Where ``value`` holds a lone UTF-16 surrogate or nests too deep, if anywhere.

    JSON's ``\\ud800`` escape decodes to a string that UTF-8 (and so SQLite, and every
    response that would echo it) cannot encode; refusing it here, once, keeps it out of
    every handler. Iterative, so depth is a message rather than a RecursionError.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"{where}: nested deeper than {MAX_DEPTH} levels"
        if isinstance(item, dict):
            for key, sub in item.items():
                at = f"{where}.{str(key)[:40]}".lstrip(".")
                if isinstance(key, str) and _has_surrogate(key):
                    return f"{at}: key is not valid Unicode (a lone UTF-16 surrogate)"
                if isinstance(sub, str):
                    if _has_surrogate(sub):
                        return f"{at}: not valid Unicode (a lone UTF-16 surrogate)"
                elif isinstance(sub, dict | list):
                    stack.append((sub, at, depth + 1))
        elif isinstance(item, list):
            if set(map(type, item)) <= _SCALARS:  # token ids, tensor data: C speed
                continue
            for i, sub in enumerate(item):
                if isinstance(sub, str):
                    if _has_surrogate(sub):
                        return f"{where}[{i}]: not valid Unicode (a lone UTF-16 surrogate)"
                elif isinstance(sub, dict | list):
                    stack.append((sub, f"{where}[{i}]", depth + 1))
    return None


def parse_body(raw: bytes | dict[str, Any], model: type[M]) -> M:
    """Bytes (or a decoded dict) -> ``model``, or ``BadRequest`` naming every problem."""
    if isinstance(raw, bytes | bytearray):
        try:
            raw = json.loads(raw or b"null")
        # ValueError: an integer past Python's 4300-digit limit; RecursionError: nesting.
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(raw, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(raw).__name__}")
    problem = _problem(raw)
    if problem is not None:
        raise BadRequest(f"invalid request: {problem}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = [
            f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}"
            for err in e.errors()[:10]
        ]
        raise BadRequest("invalid request: " + "; ".join(problems)) from None


# ---- model input ---------------------------------------------------------------------
class WireText(WireModel):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[Int64]


class WireImage(WireModel):
    type: Literal["image"]
    # On the JSON wire the bytes are base64 text (the protobuf wire carries them raw).
    data: Annotated[bytes, WithJsonSchema({"type": "string", "contentEncoding": "base64"})]
    format: str = Field("png", max_length=16)
    expected_tokens: Int64 | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _b64(cls, value: Any) -> Any:
        if isinstance(value, str):  # JSON carries the bytes as base64
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("image data is not valid base64") from None
        return value

    @field_serializer("data")
    def _b64_out(self, data: bytes) -> str:
        return base64.b64encode(data).decode()


class WireModelInput(WireModel):
    chunks: list[Annotated[WireText | WireImage, Field(discriminator="type")]]

    @classmethod
    def of(cls, model_input: ModelInput) -> WireModelInput:
        return cls(
            chunks=[
                WireText(tokens=c.tokens)
                if isinstance(c, EncodedTextChunk)
                else WireImage(
                    type="image", data=c.data, format=c.format, expected_tokens=c.expected_tokens
                )
                for c in model_input.chunks
            ]
        )


class WireTensor(WireModel):
    data: list[float] | list[Int64]  # as ``TensorData``: token ids stay integers in JSON
    dtype: Literal["float32", "int64"]
    shape: list[Annotated[int, Field(ge=0, le=MAX_TENSOR_VALUES)]] | None = None
    sparse_crow_indices: list[Int64] | None = None
    sparse_col_indices: list[Int64] | None = None

    @classmethod
    def of(cls, tensor: TensorData) -> WireTensor:
        # Flat, without the shape: loss inputs are 1-D whatever shape the tensor carries.
        return cls(data=tensor.data, dtype=tensor.dtype)

    def flat(self, where: str) -> np.ndarray:
        """The values as a 1-D array (sparse CSR densified with zeros)."""
        values = np.asarray(self.data, dtype=np.float64)
        if self.shape is not None and math.prod(self.shape) > MAX_TENSOR_VALUES:
            raise BadRequest(f"{where}: shape {self.shape} exceeds {MAX_TENSOR_VALUES:,} values")
        if self.sparse_crow_indices is not None:
            if self.shape is None or len(self.shape) != 2 or self.sparse_col_indices is None:
                raise BadRequest(f"{where}: a sparse tensor needs a 2-D shape and column indices")
            rows, cols = self.shape
            crow, col = self.sparse_crow_indices, self.sparse_col_indices
            if (
                len(crow) != rows + 1
                or len(col) != len(values)
                or crow[0] != 0
                or crow[-1] != len(values)
                or any(a > b for a, b in zip(crow, crow[1:], strict=False))
            ):  # row pointers must rise from 0 to the value count, or k below runs off
                raise BadRequest(f"{where}: inconsistent sparse CSR indices")
            dense = np.zeros((rows, cols))
            for r in range(rows):
                for k in range(crow[r], crow[r + 1]):
                    if not 0 <= col[k] < cols:
                        raise BadRequest(f"{where}: sparse column index out of range")
                    dense[r, col[k]] = values[k]
            values = dense
        elif self.shape is not None:
            if math.prod(self.shape) != values.size:
                raise BadRequest(
                    f"{where}: shape {self.shape} holds {math.prod(self.shape)} values, data has {values.size}"
                )
            values = values.reshape(self.shape)
        if values.ndim > 1 and max(values.shape[1:], default=1) != 1:
            raise BadRequest(
                f"{where}: only 1-D loss inputs are supported (got shape {list(values.shape)})"
            )
        values = values.reshape(-1)
        if not np.isfinite(values).all():
            raise BadRequest(f"{where}: contains NaN or infinity")
        if self.dtype == "int64" and not np.array_equal(values, np.round(values)):
            raise BadRequest(f"{where}: int64 tensor has non-integer values")
        return values


class WireDatum(WireModel):
    model_input: WireModelInput
    loss_fn_inputs: dict[str, WireTensor] = Field(default_factory=dict)

    @classmethod
    def of(cls, datum: Datum) -> WireDatum:
        return cls(
            model_input=WireModelInput.of(datum.model_input),
            loss_fn_inputs={k: WireTensor.of(v) for k, v in datum.loss_fn_inputs.items()},
        )


# ---- hyperparameters -----------------------------------------------------------------
class WireAdam(WireModel):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def to_adam(self) -> AdamParams:
        v = self.model_dump()
        if not all(math.isfinite(x) for x in v.values()):
            raise BadRequest("adam_params: every value must be finite")
        if v["learning_rate"] < 0 or v["weight_decay"] < 0 or v["grad_clip_norm"] < 0:
            raise BadRequest(
                "adam_params: learning_rate, weight_decay, grad_clip_norm must be >= 0"
            )
        if not (0 <= v["beta1"] < 1 and 0 <= v["beta2"] < 1) or v["eps"] <= 0:
            raise BadRequest("adam_params: betas must be in [0, 1) and eps > 0")
        return AdamParams(**v)


class WireSamplingParams(WireModel):
    max_tokens: int | None = Field(None, ge=1, le=8192)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)  # reduced mod 2**63 below
    stop: str | list[str] | list[Int64] | None = None
    temperature: float = Field(1.0, ge=0, le=100)
    top_k: Int64 = -1
    top_p: float = Field(1.0, gt=0, le=1)

    def to_params(self) -> SamplingParams:
        if self.top_k < -1:
            raise BadRequest("sampling_params.top_k must be -1 or 0 (no limit) or >= 1")
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or None)
        return SamplingParams(
            max_tokens=self.max_tokens or 64,
            temperature=self.temperature,
            top_p=self.top_p,
            # Tinker spells "no limit" -1, Fireworks and vLLM's OpenAI server 0.
            top_k=-1 if self.top_k == 0 else self.top_k,
            stop=stop,
            seed=None if self.seed is None else self.seed % 2**63,
        )


# ---- results -------------------------------------------------------------------------
def tinker_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Names as ``name:reduction`` (the client splits on the one colon to combine chunks)."""
    out = {}
    for key, value in metrics.items():
        out[key if key.count(":") == 1 else key.replace(":", "_") + ":mean"] = float(value)
    return out


def forward_backward_json(out: ForwardBackwardOutput) -> dict[str, Any]:
    return {
        "loss_fn_output_type": "TensorData",
        "metrics": tinker_metrics(out.metrics),
        "loss_fn_outputs": [{k: t.model_dump() for k, t in o.items()} for o in out.loss_fn_outputs],
    }


def forward_backward_from_json(raw: dict[str, Any]) -> ForwardBackwardOutput:
    outputs = [{k: TensorData(**v) for k, v in o.items()} for o in raw["loss_fn_outputs"]]
    return ForwardBackwardOutput(loss_fn_outputs=outputs, metrics=raw.get("metrics", {}))


def sample_json(response: SampleResponse) -> dict[str, Any]:
    return {"type": "sample", **response.model_dump()}


def sample_from_json(raw: dict[str, Any]) -> SampleResponse:
    return SampleResponse(sequences=raw["sequences"], prompt_logprobs=raw.get("prompt_logprobs"))
