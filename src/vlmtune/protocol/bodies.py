"""Request bodies of the Tinker routes (and vlmtune's additions to them).

Field names and defaults are Tinker's; a comment marks each vlmtune extension. The
SDK writes the forward-pass body with ``forward_backward_body``; the server reads
every body with ``wire.parse_body``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from vlmtune.protocol.errors import BadRequest
from vlmtune.protocol.wire import (
    INT64_MAX,
    Int64,
    SeqId,
    WireAdam,
    WireDatum,
    WireModel,
    WireModelInput,
    WireSamplingParams,
)
from vlmtune.types import AdamParams, Datum

# The largest LoRA rank a run may ask for, over the Tinker routes or a trainer job.
MAX_LORA_RANK = 1024
# Micro-batches per optimizer step a trainer job may declare (more is a typo, not a plan).
MAX_GRADIENT_ACCUMULATION = 65536
# A model name, display name or profile reference (a hub id is at most 96 characters).
MAX_NAME_CHARS = 200


class ModelIdBody(WireModel):
    model_id: str


class RetrieveBody(WireModel):
    request_id: str
    allow_metadata_only: bool = False


class SessionBody(WireModel):
    session_id: str


class CreateSessionBody(WireModel):
    """What the ``tinker`` client sends to open a session (kept only as its size)."""

    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None


class SamplingSessionBody(WireModel):
    session_id: str | None = None
    sampling_session_seq_id: Int64 | None = None
    base_model: str | None = None
    model_path: str | None = None


class FwdBwdInput(WireModel):
    data: list[WireDatum] = Field(min_length=1)
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float | str] | None = None


class ForwardBackwardBody(WireModel):
    model_id: str
    seq_id: SeqId | None = None
    # tinker 0.23 (and the Fireworks clients built on it) send ``forward``'s input as
    # ``forward_input``: the same shape under the name of its own request type.
    forward_backward_input: FwdBwdInput
    forward_only: bool = False

    @model_validator(mode="before")
    @classmethod
    def _forward_input(cls, data: Any) -> Any:
        if isinstance(data, dict) and "forward_input" in data:
            data = dict(data)
            data.setdefault("forward_backward_input", data.pop("forward_input"))
        return data


# How ``optim_step`` scales the gradients accumulated since the last step (the Fireworks
# clients' ``grad_accumulation_normalization``): by 1 / the positions whose loss input
# was non-zero, by 1 / the data with any such position, or not at all.
GradNormalization = Literal["num_loss_tokens", "num_sequences", "none"]


class OptimStepBody(WireModel):
    model_id: str
    seq_id: SeqId | None = None
    adam_params: WireAdam | None = None
    optim_params: WireAdam | None = None
    optimizer_params: dict[str, Any] | None = None
    # Fireworks extension; absent or "none": the gradients as accumulated (Tinker's).
    grad_accumulation_normalization: GradNormalization | None = None

    def params(self) -> AdamParams:
        if self.optimizer_params is not None:
            raise BadRequest("this server only has the AdamW optimizer (send adam_params)")
        return (self.adam_params or self.optim_params or WireAdam()).to_adam()


class LoraWire(WireModel):
    rank: int = Field(ge=0, le=MAX_LORA_RANK)
    seed: Int64 | None = None  # torch seeds are 64-bit
    # Fireworks extension (tinker's LoraConfig has none): the LoRA scale's numerator;
    # absent, the engine's default (32, what the Fireworks clients send too).
    alpha: int | None = Field(None, ge=1, le=1 << 20)


class CreateModelBody(WireModel):
    session_id: str
    model_seq_id: SeqId
    base_model: str
    lora_config: LoraWire | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None  # vlmtune extension: EngineConfig overrides
    # Fireworks extension: a frozen copy of the base model (a DPO/KL reference) that
    # serves forward passes only; it takes no lora_config.
    base_only: bool = False


class SaveWeightsBody(WireModel):
    model_id: str
    path: str | None = None
    seq_id: SeqId | None = None
    overwrite: bool = False
    user_metadata: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None  # vlmtune extension: returned by load_state


class SaveSamplerBody(WireModel):
    model_id: str
    path: str | None = None
    seq_id: SeqId | None = None
    sampling_session_seq_id: Int64 | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    # What is written (vlmtune's "base"/"merged", and the Fireworks clients' names):
    #   base:   the run's weights as they train: a LoRA adapter directory, or the full
    #           model for full fine-tuning.
    #   delta:  Fireworks' diff against the last base, for hot-loading; vlmtune writes
    #           what base writes, so every delta checkpoint also stands alone.
    #   merged, merged_base: a LoRA folded into its base, written as a full model
    #           directory (for full fine-tuning the same as base).
    # The checkpoint is recorded as what was written: base or merged (``saving_mode``).
    checkpoint_type: Literal["base", "delta", "merged", "merged_base"] = "base"
    # Fireworks: the merged model's dtype; vlmtune writes the engine's ("source") only.
    export_precision: Literal["source", "bf16", "nvfp4", "mxfp8", "fp8_block128"] | None = None
    user_metadata: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None  # Fireworks: the client's own bookkeeping, kept

    def saving_mode(self) -> Literal["base", "merged"]:
        """How the engine writes this checkpoint (see ``checkpoint_type``)."""
        if self.export_precision not in (None, "source"):
            raise BadRequest(
                f"export_precision {self.export_precision!r}: this server writes the weights "
                'in the engine\'s own dtype (send "source" or leave it out)'
            )
        return "merged" if self.checkpoint_type in ("merged", "merged_base") else "base"


class LoadWeightsBody(WireModel):
    model_id: str | None = None
    seq_id: SeqId | None = None
    session_id: str | None = None
    model_seq_id: SeqId | None = None
    base_model: str | None = None
    path: str
    optimizer: bool = True
    user_metadata: dict[str, Any] | None = None


class SampleBody(WireModel):
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    seq_id: SeqId | None = None
    num_samples: int = Field(1, ge=1, le=128)
    prompt: WireModelInput
    sampling_params: WireSamplingParams = Field(default_factory=WireSamplingParams)
    prompt_logprobs: bool | None = None
    prompt_logprobs_last_n: int | None = Field(None, ge=1, le=INT64_MAX)
    topk_prompt_logprobs: Int64 = 0
    topk_sample_logprobs: Int64 = 0
    target_prompt_logprobs: Any = None
    prompt_alt_tokens_k: Int64 = 0

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


def forward_backward_body(
    data: Sequence[Datum],
    loss_fn: str,
    loss_fn_config: dict[str, Any] | None,
    forward_only: bool = False,
) -> dict[str, Any]:
    """The JSON of a ``ForwardBackwardBody`` (the SDK adds ``model_id``).

    Built as a plain dict, not validated here: a request the server refuses comes back
    as its 400, the same from every client.
    """
    return {
        "forward_only": forward_only,
        "forward_backward_input": {
            "data": [WireDatum.of(d).model_dump(exclude_none=True) for d in data],
            "loss_fn": loss_fn,
            "loss_fn_config": loss_fn_config,
        },
    }
