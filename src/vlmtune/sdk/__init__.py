"""The Python SDK: training primitives as futures, in-process (and, later, over HTTP)."""

from vlmtune.sdk.client import SamplingClient, ServiceClient, TrainingClient
from vlmtune.sdk.datum import datum_from_tokens_weights, scale_weights, weighted_token_count
from vlmtune.sdk.futures import APIFuture
from vlmtune.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ImageChunk,
    ModelInput,
    SamplingParams,
    TensorData,
)

__all__ = [
    "APIFuture",
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ImageChunk",
    "ModelInput",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "TensorData",
    "TrainingClient",
    "datum_from_tokens_weights",
    "scale_weights",
    "weighted_token_count",
]
