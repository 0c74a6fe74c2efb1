"""The Python SDK: training primitives as futures, in-process or over HTTP (``connect``)."""

from vlmtune.sdk.client import SamplingClient, ServiceClient, TrainingClient, connect
from vlmtune.sdk.datum import datum_from_tokens_weights, scale_weights, weighted_token_count
from vlmtune.sdk.futures import APIFuture
from vlmtune.sdk.protocol import (
    SamplingClientProtocol,
    ServiceClientProtocol,
    TrainingClientProtocol,
)
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
    "SamplingClientProtocol",
    "SamplingParams",
    "ServiceClient",
    "ServiceClientProtocol",
    "TensorData",
    "TrainingClient",
    "TrainingClientProtocol",
    "connect",
    "datum_from_tokens_weights",
    "scale_weights",
    "weighted_token_count",
]
