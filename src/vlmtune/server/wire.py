"""Request bodies on the wire: pydantic models of Tinker's JSON shapes.

They also take the dicts ``proto.py`` decodes, and ignore fields this server does not
use. Shape and type errors become one ``BadRequest`` naming every field at fault;
``validate.py`` then checks the content against the run's model.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlmtune.types import (
    AdamParams,
    SamplingParams,
)


class BadRequest(ValueError):
    """A client error: becomes HTTP 400 (or a failed future with category ``user``)."""


class NotFound(LookupError):
    """An unknown id: becomes HTTP 404."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def parse_body(raw: bytes | dict[str, Any], model: type[_Wire]) -> Any:
    """Bytes (or a decoded dict) -> ``model``, or ``BadRequest`` naming every problem."""
    if isinstance(raw, bytes | bytearray):
        try:
            raw = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = [
            f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}"
            for err in e.errors()[:10]
        ]
        raise BadRequest("invalid request: " + "; ".join(problems)) from None


# ---- model input ---------------------------------------------------------------------
class WireText(_Wire):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int]


class WireImage(_Wire):
    type: Literal["image"]
    data: bytes
    format: str = "png"
    expected_tokens: int | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _b64(cls, value: Any) -> Any:
        if isinstance(value, str):  # JSON carries the bytes as base64
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("image data is not valid base64") from None
        return value


class WireModelInput(_Wire):
    chunks: list[Annotated[WireText | WireImage, Field(discriminator="type")]]


class WireTensor(_Wire):
    data: list[float]
    dtype: Literal["float32", "int64"]
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None

    def flat(self, where: str) -> np.ndarray:
        """The values as a 1-D array (sparse CSR densified with zeros)."""
        values = np.asarray(self.data, dtype=np.float64)
        if self.sparse_crow_indices is not None:
            if self.shape is None or len(self.shape) != 2 or self.sparse_col_indices is None:
                raise BadRequest(f"{where}: a sparse tensor needs a 2-D shape and column indices")
            rows, cols = self.shape
            crow, col = self.sparse_crow_indices, self.sparse_col_indices
            if len(crow) != rows + 1 or len(col) != len(values) or crow[-1] != len(values):
                raise BadRequest(f"{where}: inconsistent sparse CSR indices")
            dense = np.zeros((rows, cols))
            for r in range(rows):
                for k in range(crow[r], crow[r + 1]):
                    if not 0 <= col[k] < cols:
                        raise BadRequest(f"{where}: sparse column index out of range")
                    dense[r, col[k]] = values[k]
            values = dense
        elif self.shape is not None:
            if int(np.prod(self.shape)) != values.size:
                raise BadRequest(
                    f"{where}: shape {self.shape} holds {int(np.prod(self.shape))} values, data has {values.size}"
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


class WireDatum(_Wire):
    model_input: WireModelInput
    loss_fn_inputs: dict[str, WireTensor] = Field(default_factory=dict)


# ---- request bodies ------------------------------------------------------------------
class FwdBwdInput(_Wire):
    data: list[WireDatum] = Field(min_length=1)
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float | str] | None = None


class ForwardBackwardBody(_Wire):
    model_id: str
    seq_id: int | None = None
    forward_backward_input: FwdBwdInput
    forward_only: bool = False


class WireAdam(_Wire):
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


class OptimStepBody(_Wire):
    model_id: str
    seq_id: int | None = None
    adam_params: WireAdam | None = None
    optim_params: WireAdam | None = None
    optimizer_params: dict[str, Any] | None = None

    def params(self) -> AdamParams:
        if self.optimizer_params is not None:
            raise BadRequest("this server only has the AdamW optimizer (send adam_params)")
        return (self.adam_params or self.optim_params or WireAdam()).to_adam()


class LoraWire(_Wire):
    rank: int = Field(ge=0, le=1024)
    seed: int | None = None


class CreateModelBody(_Wire):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: LoraWire | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None  # vlmtune extension: EngineConfig overrides


class SaveWeightsBody(_Wire):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None  # vlmtune extension: returned by load_state


class SaveSamplerBody(_Wire):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    sampling_session_seq_id: int | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    checkpoint_type: Literal["base", "merged"] = "base"  # vlmtune extension
    user_metadata: dict[str, Any] | None = None


class LoadWeightsBody(_Wire):
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    path: str
    optimizer: bool = True
    user_metadata: dict[str, Any] | None = None


class WireSamplingParams(_Wire):
    max_tokens: int | None = Field(None, ge=1, le=8192)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(1.0, ge=0, le=100)
    top_k: int = -1
    top_p: float = Field(1.0, gt=0, le=1)

    def to_params(self) -> SamplingParams:
        if self.top_k == 0 or self.top_k < -1:
            raise BadRequest("sampling_params.top_k must be -1 (no limit) or >= 1")
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or None)
        return SamplingParams(
            max_tokens=self.max_tokens or 64,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=stop,
            seed=None if self.seed is None else self.seed % 2**63,
        )


class SampleBody(_Wire):
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    seq_id: int | None = None
    num_samples: int = Field(1, ge=1, le=128)
    prompt: WireModelInput
    sampling_params: WireSamplingParams = Field(default_factory=WireSamplingParams)
    prompt_logprobs: bool | None = None
    prompt_logprobs_last_n: int | None = Field(None, ge=1)
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: Any = None
    prompt_alt_tokens_k: int = 0

    def check_supported(self) -> None:
        unsupported = [
            name
            for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k")
            if getattr(self, name)
        ]
        if self.target_prompt_logprobs is not None:
            unsupported.append("target_prompt_logprobs")
        if unsupported:
            raise BadRequest(f"not supported by this server: {', '.join(unsupported)}")
