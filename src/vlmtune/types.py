"""Plain data types shared by every layer (no model code).

They mirror the hosted training SDKs' types (Tinker's ``Datum``, ``ModelInput``,
``EncodedTextChunk``, ``ImageChunk``, ``TensorData``, ``AdamParams``,
``SamplingParams``) so a loop written for one runs on the other, and so the HTTP
server can speak that wire format without translation.

Convention (as in Tinker): a ``Datum`` for next-token training holds the model input
``tokens[:-1]`` and, in ``loss_fn_inputs``, ``target_tokens = tokens[1:]`` and
``weights = weights[1:]``: position ``t`` of the input predicts ``target_tokens[t]``.
Image chunks occupy ``expected_tokens`` positions of the input (the ``<|image_pad|>``
run); ``<|vision_start|>``/``<|vision_end|>`` live in the neighbouring text chunks.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch
from pydantic import BaseModel, ConfigDict, Field


class _Plain(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class EncodedTextChunk(_Plain):
    """A run of token ids."""

    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int]

    @property
    def length(self) -> int:
        return len(self.tokens)


class ImageChunk(_Plain):
    """One encoded image (PNG/JPEG/WebP/GIF bytes) standing for ``expected_tokens`` positions.

    ``expected_tokens`` is the number of ``<|image_pad|>`` tokens the model's processor
    makes for this image at the configured ``min_pixels``/``max_pixels``; the engine
    checks it against its own count and refuses a mismatch.
    """

    type: Literal["image"] = "image"
    data: bytes
    format: str = "png"
    expected_tokens: int

    @property
    def length(self) -> int:
        return self.expected_tokens

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


Chunk = EncodedTextChunk | ImageChunk


class ModelInput(_Plain):
    """A token sequence made of text and image chunks, in order."""

    chunks: list[EncodedTextChunk | ImageChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    @property
    def length(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def images(self) -> list[ImageChunk]:
        return [c for c in self.chunks if isinstance(c, ImageChunk)]

    def append(self, chunk: EncodedTextChunk | ImageChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[token]))

    def to_ints(self, image_token_id: int | None = None) -> list[int]:
        """Flatten to token ids; image chunks become ``image_token_id`` repeated.

        Raises if there is an image chunk and no ``image_token_id`` is given.
        """
        out: list[int] = []
        for c in self.chunks:
            if isinstance(c, EncodedTextChunk):
                out.extend(c.tokens)
            else:
                if image_token_id is None:
                    raise ValueError("ModelInput has image chunks: pass image_token_id")
                out.extend([image_token_id] * c.expected_tokens)
        return out


class TensorData(_Plain):
    """A flat list of numbers with a dtype and shape (wire-friendly tensor)."""

    data: list[float] | list[int]
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        dtype: Literal["int64", "float32"] = (
            "int64" if np.issubdtype(array.dtype, np.integer) else "float32"
        )
        return cls(data=array.reshape(-1).tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        return cls.from_numpy(
            tensor.detach().float().cpu().numpy()
            if tensor.is_floating_point()
            else tensor.detach().cpu().numpy()
        )

    def to_numpy(self) -> np.ndarray:
        arr = np.asarray(self.data, dtype=np.int64 if self.dtype == "int64" else np.float32)
        return arr.reshape(self.shape) if self.shape is not None else arr

    def to_torch(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list:
        return list(self.data)


class Datum(_Plain):
    """One training example: model input plus the loss function's per-token inputs.

    ``loss_fn_inputs`` keys by loss:
      cross_entropy:        target_tokens (int64, T), weights (float32, T)
      importance_sampling:  target_tokens, logprobs (sampler's, T), advantages (T)
      ppo:                  as importance_sampling
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)
    # Local bookkeeping, never serialised: the wire format stays Tinker's.
    images_dropped: int = Field(
        0,
        ge=0,
        exclude=True,
        description="images of the source conversation the renderer left out (over the "
        "per-message cap, or in a system turn)",
    )


class AdamParams(_Plain):
    """AdamW hyperparameters for one ``optim_step`` (Tinker's names and defaults)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 disables clipping


class SamplingParams(_Plain):
    """How ``sample`` decodes. ``temperature=0`` is greedy."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] | list[int] | None = None
    seed: int | None = None


StopReason = Literal["stop", "length"]


class SampledSequence(_Plain):
    tokens: list[int]
    logprobs: list[float] | None = None
    stop_reason: StopReason = "stop"


class SampleResponse(_Plain):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None


class ForwardBackwardOutput(_Plain):
    """Per-datum outputs (``logprobs`` of each target token) and scalar metrics.

    Metric names carry their reduction after a colon, as Tinker's do
    (``loss:sum``, ``num_weighted_tokens:sum``).
    """

    loss_fn_output_type: str = "TensorData"
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class OptimStepResponse(_Plain):
    metrics: dict[str, float] = Field(default_factory=dict)


class SaveWeightsResponse(_Plain):
    path: str


# What trains: every weight ("full"), a LoRA ("lora"), or a LoRA on 4-bit base weights.
TrainingMode = Literal["full", "lora", "qlora"]


def mode_for(lora_rank: int, qlora: bool = False) -> TrainingMode:
    """The training mode a client's ``lora_rank`` asks for (Tinker's convention): 0
    trains every weight, a positive rank a LoRA of that rank (a QLoRA with ``qlora``)."""
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be 0 (full fine-tuning) or positive, got {lora_rank}")
    if lora_rank == 0:
        if qlora:
            raise ValueError("qlora trains a LoRA: lora_rank must be positive")
        return "full"
    return "qlora" if qlora else "lora"


def lora_rank_of(mode: TrainingMode, lora_rank: int) -> int:
    """The rank a run reports for ``mode`` (the inverse of ``mode_for``): 0 when every
    weight trains, whatever rank its engine config carries unused."""
    return 0 if mode == "full" else lora_rank
