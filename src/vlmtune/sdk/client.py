"""``ServiceClient`` / ``TrainingClient`` / ``SamplingClient``: the primitives as futures.

These clients run the engine in this process (no server, no copies); ``sdk/http.py``
has the same clients over HTTP, and ``sdk/protocol.py`` the interface both implement.
``connect(base_url=None)`` picks one. The method names and argument shapes follow the
hosted training SDKs (Tinker), so loops written for one run on the other.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmtune.data import parse_messages
from vlmtune.data.schema import Message, RowKind
from vlmtune.engine.engine import CustomLossFn, EngineConfig, TrainingEngine
from vlmtune.render import Renderer, datum_from_rendered
from vlmtune.sdk.futures import APIFuture, OrderedExecutor
from vlmtune.sdk.protocol import ServiceClientProtocol
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
    lora_rank_of,
    mode_for,
)


def to_messages(messages: Sequence[Message | dict[str, Any]]) -> list[Message]:
    """Accept OpenAI-style dicts as well as parsed ``Message``s."""
    parsed = [m for m in messages if isinstance(m, Message)]
    if len(parsed) == len(messages):
        return parsed
    raw = [m for m in messages if isinstance(m, dict)]
    if len(raw) != len(messages):
        raise TypeError("pass either Message objects or message dicts, not a mix")
    kind: RowKind = "rl" if raw and raw[-1].get("role") == "user" else "sft"
    # No cap here: the renderer applies the engine's, and counts what it drops.
    return parse_messages(raw, kind=kind, max_images_per_message=None)


class ImagesDroppedWarning(UserWarning):
    """A conversation had images the model will not see (over the cap, or in a system turn)."""


def datum_from_conversation(
    renderer: Any, messages: Sequence[Message | dict[str, Any]], train_on: str
) -> Datum:
    """``datum_from_messages`` for either client: render, warn about dropped images, and
    count them on the datum (``Datum.images_dropped``, not sent over the wire)."""
    rendered = renderer.render(to_messages(messages), train_on=train_on)
    if rendered.images_dropped:
        cap = renderer.max_images_per_message
        limit = "any number of" if cap is None else f"at most {cap}"
        warnings.warn(
            f"datum_from_messages: {rendered.images_dropped} image(s) dropped: the model is "
            f"shown {limit} image(s) per user message (max_images_per_message; 0: no cap) "
            "and none in system or assistant turns",
            ImagesDroppedWarning,
            stacklevel=3,
        )
    return datum_from_rendered(rendered, renderer.image_token_id)


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
    def renderer(self) -> Renderer:
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
        """A next-token datum from a conversation (OpenAI-style dicts or ``Message``s).

        Images the model is not shown (beyond ``max_images_per_message`` in a message,
        or in a system turn) are dropped with an ``ImagesDroppedWarning`` and counted in
        the datum's ``images_dropped``.
        """
        return datum_from_conversation(self.engine.renderer, messages, train_on)

    @property
    def renderer(self) -> Renderer:
        return self.engine.renderer

    def get_tokenizer(self) -> Any:
        return self.engine.processor.tokenizer

    def describe(self) -> str:
        return self.engine.describe()

    def prefetch_images(self, datums: Sequence[Datum], workers: int | None = None) -> str:
        """Decode and preprocess every image of ``datums`` into the engine's caches now
        (worker processes when that pays; ``workers=0``: in this process), so the
        training loop never decodes. Returns the one-line summary."""
        from vlmtune.engine.prefetch import prefetch_images

        return prefetch_images(list(datums), self.engine.image_preprocessor, workers).summary()

    def get_info(self) -> dict[str, Any]:
        return {
            "base_model": self.engine.config.base_model,
            "mode": self.engine.config.mode,
            "lora_rank": lora_rank_of(self.engine.config.mode, self.engine.config.lora_rank),
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
    """Creates in-process clients. Prefer ``connect()``, which also reaches a server.

    ``ServiceClient(base_url=...)`` still returns the HTTP service client (as
    ``tinker.ServiceClient(base_url=...)`` does, so ported scripts keep working): it is
    ``connect(base_url, ...)``, and this is the only place that switch is made.
    """

    def __new__(cls, base_url: str | None = None, api_key: str | None = None, **kwargs: Any) -> Any:
        if base_url is not None:
            return connect(base_url, api_key, **kwargs)
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
        the engine shards itself over the ranks. ``max_images_per_message``: unset, the
        model family's cap (Qwen3-VL: 1); 0, no cap (``vlmtune.defaults.image_cap``).
        """
        if training_shape_ref is not None:
            merged = {**self.engine_defaults, **engine_kwargs}
            mode = merged.get("mode") or mode_for(lora_rank)
            base_model, engine_kwargs = _apply_training_shape(
                training_shape_ref, base_model, merged, mode
            )
        if base_model is None:
            raise TypeError("create_training_client() needs base_model or training_shape_ref")
        kwargs = {**self.engine_defaults, **engine_kwargs}
        mode = kwargs.pop("mode", None) or mode_for(lora_rank)
        checkpoint_dir = kwargs.pop("checkpoint_dir", None)
        config = EngineConfig(base_model=base_model, mode=mode, lora_rank=lora_rank or 16, **kwargs)
        return self.create_training_client_from_config(config, checkpoint_dir)

    def create_training_client_from_config(
        self, config: EngineConfig, checkpoint_dir: str | Path | None = None
    ) -> TrainingClient:
        """A client for exactly ``config`` (this service's defaults do not apply);
        ``checkpoint_dir``: where bare ``save_state`` names go (default: a fresh
        ``run-*`` folder under ``checkpoint_root``)."""
        run_root = Path(checkpoint_dir or self.checkpoint_root / f"run-{uuid.uuid4().hex[:8]}")
        return TrainingClient(TrainingEngine(config), run_root)

    def create_lora_training_client(
        self, base_model: str, rank: int = 16, **engine_kwargs: Any
    ) -> TrainingClient:
        return self.create_training_client(base_model, lora_rank=rank, **engine_kwargs)

    def create_sampling_client(self, base_model: str, **engine_kwargs: Any) -> SamplingClient:
        """Sample from a base model or a saved model directory (no optimizer state).

        The image cap is the training client's: the family's unless
        ``max_images_per_message`` is given (0: no cap).
        """
        kwargs = {**self.engine_defaults, **engine_kwargs}
        kwargs.setdefault("mode", "full")
        engine = TrainingEngine(EngineConfig(base_model=base_model, **kwargs))
        return SamplingClient(engine, OrderedExecutor("vlmtune-sample"))


def connect(
    base_url: str | None = None, api_key: str | None = None, **engine_defaults: Any
) -> ServiceClientProtocol:
    """The entry point: clients of an in-process engine (no ``base_url``), or of the
    ``vlmtune serve`` at ``base_url`` (key: ``api_key``, else ``$VLMTUNE_API_KEY`` or
    ``$TINKER_API_KEY``). Both implement ``ServiceClientProtocol``, so code written
    against one runs on the other. ``engine_defaults`` apply to every client created
    (in-process also ``checkpoint_root``; a server picks its own device and disk)."""
    if base_url is None:
        if api_key is not None:
            raise ValueError("connect(): api_key is for a server; pass its base_url as well")
        return ServiceClient(**engine_defaults)
    from vlmtune.sdk.http_service import HttpServiceClient

    return HttpServiceClient(base_url, api_key, **engine_defaults)


def _apply_training_shape(
    name: str, base_model: str | None, kwargs: dict[str, Any], mode: str
) -> tuple[str, dict[str, Any]]:
    """The shape's model and engine settings for ``mode`` merged into ``kwargs`` (clashes
    raise): a shape may set some per mode (CPU offload for full fine-tuning)."""
    from vlmtune.engine.distributed import env_info
    from vlmtune.models.registry import get_model_spec
    from vlmtune.planning.shapes import get_shape

    shape = get_shape(name).for_mode(mode)
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
