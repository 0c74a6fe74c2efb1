"""What a client is, whichever transport carries it: the one interface recipes program to.

``TrainingClient`` / ``SamplingClient`` (in-process, ``sdk/client.py``) and
``HttpTrainingClient`` / ``HttpSamplingClient`` (``sdk/http.py``, against ``vlmtune
serve``) both implement these protocols completely, with the same signatures
(``tests/sdk/test_protocol.py`` checks it), so a loop written against them runs
unchanged on either. ``connect(base_url=None)`` returns a ``ServiceClientProtocol``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from vlmtune.data.schema import Message
from vlmtune.sdk.futures import APIFuture
from vlmtune.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    SaveWeightsResponse,
)

if TYPE_CHECKING:
    from vlmtune.engine.engine import EngineConfig
    from vlmtune.render import Renderer

# A user loss on per-token logprobs (one ``(T_i,)`` tensor per datum, attached to the
# graph): (loss, metrics).
CustomLoss = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


@runtime_checkable
class SamplingClientProtocol(Protocol):
    """Completions (with logprobs) from some weights: live, a snapshot, or a saved model."""

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
    ) -> APIFuture[SampleResponse]: ...

    def sample_many(
        self,
        prompts: Sequence[ModelInput],
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
    ) -> APIFuture[list[SampleResponse]]: ...

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]: ...

    @property
    def renderer(self) -> Renderer: ...

    def get_tokenizer(self) -> Any: ...


@runtime_checkable
class TrainingClientProtocol(Protocol):
    """The training primitives as futures; calls on one client run in call order."""

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[ForwardBackwardOutput]: ...

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[ForwardBackwardOutput]: ...

    def forward_reference(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """``forward`` under the base model (LoRA disabled, or a frozen copy for full FT)."""
        ...

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: CustomLoss, *, logprobs_where: str | None = None
    ) -> APIFuture[ForwardBackwardOutput]: ...

    def optim_step(self, adam_params: AdamParams) -> APIFuture[OptimStepResponse]: ...

    def save_state(self, name: str, extra: dict[str, Any] | None = None) -> APIFuture[str]:
        """Resumable state; the result is where it is: a directory in-process, a
        ``tinker://`` path on a server. ``load_state`` takes either."""
        ...

    def load_state(self, path: str) -> APIFuture[dict[str, Any]]: ...

    def save_weights_for_sampler(self, name: str) -> APIFuture[SaveWeightsResponse]: ...

    def save_weights_and_get_sampling_client(self, name: str) -> SamplingClientProtocol: ...

    def create_sampling_client(self) -> SamplingClientProtocol: ...

    def datum_from_messages(
        self, messages: Sequence[Message | dict[str, Any]], train_on: str = "all_assistant"
    ) -> Datum: ...

    @property
    def renderer(self) -> Renderer: ...

    def get_tokenizer(self) -> Any: ...

    def get_info(self) -> dict[str, Any]: ...

    def describe(self) -> str:
        """One line for a run's log: what trains, on what (and where, for a server)."""
        ...

    def prefetch_images(self, datums: Sequence[Datum], workers: int | None = None) -> str:
        """Decode and preprocess every image of ``datums`` once, up front, where the model
        runs; a one-line summary. (A server preprocesses on first use: no-op there.)"""
        ...


@runtime_checkable
class ServiceClientProtocol(Protocol):
    """Creates clients: in-process engines, or runs on a server (``connect``)."""

    def create_training_client(
        self, base_model: str, lora_rank: int = 0, **engine_kwargs: Any
    ) -> TrainingClientProtocol: ...

    def create_lora_training_client(
        self, base_model: str, rank: int = 16, **engine_kwargs: Any
    ) -> TrainingClientProtocol: ...

    def create_training_client_from_config(
        self, config: EngineConfig, checkpoint_dir: str | Path | None = None
    ) -> TrainingClientProtocol:
        """A client for exactly ``config`` (``EngineConfig.from_job`` makes one from a job).
        ``checkpoint_dir``: where bare ``save_state`` names go in-process (a server keeps
        its own)."""
        ...

    def create_sampling_client(
        self, base_model: str, **engine_kwargs: Any
    ) -> SamplingClientProtocol: ...
