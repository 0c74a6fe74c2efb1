"""``ServiceClient`` / ``TrainingClient`` / ``SamplingClient``: the primitives as futures.

With no ``base_url`` the clients run the engine in this process (no server, no
copies). The method names and argument shapes follow the hosted training SDKs
(Tinker), so loops written for one run on the other.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmtune.data import parse_messages
from vlmtune.data.schema import Message
from vlmtune.engine.engine import CustomLossFn, EngineConfig, TrainingEngine
from vlmtune.render import datum_from_rendered
from vlmtune.sdk.futures import APIFuture, OrderedExecutor
from vlmtune.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    SaveWeightsResponse,
    TensorData,
)


def to_messages(messages: Sequence[Message | dict[str, Any]]) -> list[Message]:
    """Accept OpenAI-style dicts as well as parsed ``Message``s."""
    if all(isinstance(m, Message) for m in messages):
        return list(messages)  # type: ignore[arg-type]
    if not all(isinstance(m, dict) for m in messages):
        raise TypeError("pass either Message objects or message dicts, not a mix")
    raw = list(messages)
    kind = "rl" if raw and raw[-1].get("role") == "user" else "sft"
    return parse_messages(raw, kind=kind, max_images_per_message=None)


class SamplingClient:
    """Samples from a training client's live weights (or a loaded snapshot)."""

    def __init__(self, engine: TrainingEngine, executor: OrderedExecutor) -> None:
        self._engine = engine
        self._executor = executor

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
    ) -> APIFuture[SampleResponse]:
        params = sampling_params or SamplingParams()
        return self._executor.submit(lambda: self._engine.sample([prompt], num_samples, params)[0])

    def sample_many(
        self,
        prompts: Sequence[ModelInput],
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
    ) -> APIFuture[list[SampleResponse]]:
        """Several prompts in one batched ``generate`` (faster than one call each)."""
        params = sampling_params or SamplingParams()
        return self._executor.submit(self._engine.sample, list(prompts), num_samples, params)

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """Log-probability of each prompt token given the ones before (first is None)."""

        def run() -> list[float | None]:
            ids = prompt.to_ints(self._engine.image_token_id)
            datum = Datum(
                model_input=prompt,
                loss_fn_inputs={
                    "target_tokens": TensorData(data=ids[1:] + [0], dtype="int64"),
                    "weights": TensorData(data=[1.0] * (len(ids) - 1) + [0.0], dtype="float32"),
                },
            )
            out = self._engine.forward([datum])
            lps = out.loss_fn_outputs[0]["logprobs"].data
            return [None, *[float(x) for x in lps[:-1]]]

        return self._executor.submit(run)

    @property
    def renderer(self) -> Any:
        return self._engine.renderer

    def get_tokenizer(self) -> Any:
        return self._engine.processor.tokenizer


class TrainingClient:
    def __init__(self, engine: TrainingEngine, checkpoint_root: Path) -> None:
        self.engine = engine
        self.checkpoint_root = checkpoint_root
        self._executor = OrderedExecutor("vlmtune-train")

    # primitives ------------------------------------------------------------------------
    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._executor.submit(self.engine.forward, list(data), loss_fn, loss_fn_config)

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._executor.submit(
            self.engine.forward_backward, list(data), loss_fn, loss_fn_config
        )

    def forward_reference(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """``forward`` under the base model (LoRA disabled, or a frozen copy for full FT)."""
        return self._executor.submit(
            self.engine.reference_forward, list(data), loss_fn, loss_fn_config
        )

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: CustomLossFn, *, logprobs_where: str | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """``logprobs_where``: a ``loss_fn_inputs`` key; logprobs only where it is non-zero
        (0 elsewhere), e.g. ``"weights"`` for a loss on the response tokens alone."""
        return self._executor.submit(
            self.engine.forward_backward_custom, list(data), loss_fn, logprobs_where=logprobs_where
        )

    def optim_step(self, adam_params: AdamParams) -> APIFuture[OptimStepResponse]:
        return self._executor.submit(self.engine.optim_step, adam_params)

    def save_state(self, name: str, extra: dict[str, Any] | None = None) -> APIFuture[str]:
        path = self._resolve(name)
        return self._executor.submit(lambda: str(self.engine.save_state(path, extra)))

    def load_state(self, path: str) -> APIFuture[dict[str, Any]]:
        return self._executor.submit(self.engine.load_state, self._resolve(path))

    def save_weights_for_sampler(self, name: str) -> APIFuture[SaveWeightsResponse]:
        path = self._resolve(name)
        return self._executor.submit(
            lambda: SaveWeightsResponse(path=str(self.engine.save_weights_for_sampler(path)))
        )

    def save_weights_and_get_sampling_client(self, name: str) -> SamplingClient:
        self.save_weights_for_sampler(name).result()
        return self.create_sampling_client()

    def create_sampling_client(self) -> SamplingClient:
        """A sampler over the live weights: it sees every later ``optim_step``."""
        return SamplingClient(self.engine, self._executor)

    # conveniences ------------------------------------------------------------------------
    def datum_from_messages(
        self, messages: Sequence[Message | dict[str, Any]], train_on: str = "all_assistant"
    ) -> Datum:
        """A next-token datum from a conversation (OpenAI-style dicts or ``Message``s)."""
        msgs = to_messages(messages)
        rendered = self.engine.renderer.render(msgs, train_on=train_on)
        return datum_from_rendered(rendered, self.engine.image_token_id)

    @property
    def renderer(self) -> Any:
        return self.engine.renderer

    def get_tokenizer(self) -> Any:
        return self.engine.processor.tokenizer

    def get_info(self) -> dict[str, Any]:
        return {
            "base_model": self.engine.config.base_model,
            "mode": self.engine.config.mode,
            "lora_rank": self.engine.config.lora_rank if self.engine.config.mode != "full" else 0,
            "step": self.engine.step,
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
        }

    def _resolve(self, name: str) -> Path:
        p = Path(name)
        return (
            p if p.is_absolute() or p.exists() or len(p.parts) > 1 else self.checkpoint_root / name
        )


class ServiceClient:
    """Entry point. ``ServiceClient()`` runs in-process; ``base_url`` selects a server."""

    def __new__(cls, base_url: str | None = None, api_key: str | None = None, **kwargs: Any) -> Any:
        # With a URL, hand back the HTTP-backed client: the same methods, run by a server.
        if base_url is not None:
            from vlmtune.sdk.http import HttpServiceClient

            return HttpServiceClient(base_url, api_key, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        checkpoint_root: str | Path = "vlmtune_checkpoints",
        **engine_defaults: Any,
    ) -> None:
        self.checkpoint_root = Path(checkpoint_root)
        self.engine_defaults = engine_defaults

    def create_training_client(
        self,
        base_model: str | None = None,
        lora_rank: int = 0,
        *,
        training_shape_ref: str | None = None,
        **engine_kwargs: Any,
    ) -> TrainingClient:
        """``lora_rank=0`` fine-tunes every language-model weight; >0 trains a LoRA.

        ``training_shape_ref`` names a training shape (``vlmtune shapes``): it sets the
        model (when ``base_model`` is None), context, precision, checkpointing and
        sharding; passing one of those settings as well is an error. Under torchrun
        the engine shards itself over the ranks.
        """
        if training_shape_ref is not None:
            base_model, engine_kwargs = _apply_training_shape(
                training_shape_ref, base_model, {**self.engine_defaults, **engine_kwargs}
            )
        if base_model is None:
            raise TypeError("create_training_client() needs base_model or training_shape_ref")
        kwargs = {**self.engine_defaults, **engine_kwargs}
        mode = kwargs.pop("mode", "full" if lora_rank == 0 else "lora")
        checkpoint_dir = kwargs.pop("checkpoint_dir", None)
        config = EngineConfig(base_model=base_model, mode=mode, lora_rank=lora_rank or 16, **kwargs)
        run_root = Path(checkpoint_dir or self.checkpoint_root / f"run-{uuid.uuid4().hex[:8]}")
        return TrainingClient(TrainingEngine(config), run_root)

    def create_lora_training_client(
        self, base_model: str, rank: int = 16, **engine_kwargs: Any
    ) -> TrainingClient:
        return self.create_training_client(base_model, lora_rank=rank, **engine_kwargs)

    def create_sampling_client(self, base_model: str, **engine_kwargs: Any) -> SamplingClient:
        """Sample from a base model or a saved model directory (no optimizer state)."""
        kwargs = {**self.engine_defaults, **engine_kwargs}
        kwargs.setdefault("mode", "full")
        engine = TrainingEngine(EngineConfig(base_model=base_model, **kwargs))
        return SamplingClient(engine, OrderedExecutor("vlmtune-sample"))


def _apply_training_shape(
    name: str, base_model: str | None, kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The shape's model and engine settings merged into ``kwargs`` (clashes raise)."""
    from vlmtune.engine.distributed import env_info
    from vlmtune.models.registry import get_model_spec
    from vlmtune.planning.shapes import get_shape

    shape = get_shape(name)
    settings = shape.engine_settings()
    if shape.gpu_type == "cpu":
        settings["device"] = "cpu"
    clashes = sorted(k for k in settings if k in kwargs)
    if (
        base_model is not None
        and get_model_spec(base_model).name != get_model_spec(shape.model).name
    ):
        clashes.insert(0, "base_model")
    if clashes:
        raise ValueError(
            f"training shape {shape.name!r} sets {', '.join(clashes)}; do not pass them as well"
        )
    world = env_info().world_size
    if world != shape.world_size:
        raise ValueError(
            f"training shape {shape.name!r} runs on {shape.world_size} processes "
            f"({shape.nodes} node(s) x {shape.gpu_count}); this run has {world}: start it with "
            f"torchrun --nnodes {shape.nodes} --nproc-per-node {shape.gpu_count}"
        )
    return shape.model, {**kwargs, **settings}
