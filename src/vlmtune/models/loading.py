"""Loading Qwen3-VL checkpoints for training: full, LoRA or QLoRA, with freezing.

``load_model(request, options)`` composes three steps: ``resolve_model_files`` (what
to load: directory, adapter, spec, processor), ``build_model`` (the base weights, as
``BuildOptions`` place them) and ``adapt_model`` (what trains: freezing, a new or saved
LoRA adapter, or a saved one merged in). ``ModelRequest`` says what to load,
``BuildOptions`` how to run it.

Hub ids come from the local Hugging Face cache; ``load_model`` downloads one that is
missing (``models/hub.py``), ``resolve_model_path`` only when asked. Adapters live in
``models/adapters.py``, saving in ``models/saving.py``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtune.models._compat import linear_patch_projection
from vlmtune.models.adapters import (
    PROJECTOR_PREFIXES,
    VISION_PREFIX,
    LoraSettings,
    adapter_base_name,
    apply_lora,
    attach_adapter,
    freeze,
    merge_adapter,
)
from vlmtune.models.hub import ModelNotCachedError as ModelNotCachedError  # re-export
from vlmtune.models.hub import ModelNotFoundError, snapshot_dir
from vlmtune.models.registry import (
    ModelSpec,
    UnknownModelError,
    get_model_spec,
    hub_id,
    known_names_hint,
    spec_from_dir,
)
from vlmtune.models.tiny import TINY_MODEL_NAME, TINY_MOE_MODEL_NAME, tiny_model_dir
from vlmtune.types import TrainingMode

MODES: tuple[TrainingMode, ...] = ("full", "lora", "qlora")


@dataclass
class LoadedModel:
    model: nn.Module  # the HF model, or a peft PeftModel wrapping it
    processor: Any
    spec: ModelSpec
    path: Path  # the resolved checkpoint directory
    mode: TrainingMode
    # What an adapter records as its base model: a hub id, or an absolute directory.
    base_name: str


def portable_base_name(spec: ModelSpec, path: Path, requested: str) -> str:
    """The base model an adapter should name so that transformers and peft find it alone.

    A hub id (the registry's, or the one asked for) works on any machine with it in the
    cache; otherwise the absolute directory: registry names such as ``tiny-qwen3-vl``
    mean nothing outside vlmtune, and a relative path breaks once the cwd changes.
    """
    for name in (spec.name, requested):
        # "runs/final" looks like an owner/name id too: an existing path is a directory.
        repo_id = None if Path(name).expanduser().exists() else hub_id(name)
        if repo_id is not None:
            return repo_id
    return str(path.expanduser().resolve())


def _builtin_dir(name: str) -> Path | None:
    key = name.strip().lower()
    if key in (TINY_MODEL_NAME, "tiny"):
        return tiny_model_dir()
    if key in (TINY_MOE_MODEL_NAME, "tiny-moe"):
        return tiny_model_dir(moe=True)
    return None


def hub_repo_id(name_or_path: str) -> str | None:
    """The Hugging Face repo ``name_or_path`` resolves through; None for a built-in
    model or an existing directory (which a revision cannot pin)."""
    if _builtin_dir(name_or_path) is not None or Path(name_or_path).expanduser().is_dir():
        return None
    return hub_id(name_or_path)


def resolve_model_path(
    name_or_path: str, *, revision: str | None = None, download: bool = False
) -> Path:
    """A local directory for a model: built-in, directory, registry or hosted name, hub id.

    Hub ids (registry and hosted names map to theirs) come from the Hugging Face cache;
    with ``download`` one missing from it is fetched into it, once per cache (see
    ``models/hub.py``). ``revision`` pins a branch, tag or commit of a hub id.
    Raises ``ModelNotFoundError`` (``ModelNotCachedError`` when only a download is
    missing) saying where it looked: the directory, the hub id and the cache.
    """
    builtin = _builtin_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    if builtin is not None or path.is_dir():
        if revision is not None:
            raise ValueError(
                f"revision {revision!r} pins a Hugging Face hub id; {name_or_path!r} is a "
                "local model (remove the revision)"
            )
        return builtin or path
    looked = f"model {name_or_path!r} not found: {path.absolute()} is not a directory"
    repo_id = hub_id(name_or_path)
    if repo_id is None:
        raise ModelNotFoundError(
            f"{looked}, and it is neither a known model name nor a Hugging Face hub id "
            f"(owner/name): {known_names_hint(name_or_path)}, or the path of a checkpoint "
            "directory"
        )
    if repo_id != name_or_path.strip():
        looked += f" ({name_or_path!r} is the Hugging Face id {repo_id!r})"
    return snapshot_dir(repo_id, revision, download=download, looked=looked)


def load_processor(
    path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
) -> Any:
    """AutoProcessor for a checkpoint, with the image processor's pixel limits overridden."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    if min_pixels is not None or max_pixels is not None:
        ip = processor.image_processor
        size = {"shortest_edge": ip.size["shortest_edge"], "longest_edge": ip.size["longest_edge"]}
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        ip.size = _size_dict(size)
    return processor


def _size_dict(size: dict[str, int]) -> Any:
    try:  # transformers 5 keeps sizes as SizeDict; a plain dict works too
        from transformers.image_utils import SizeDict

        return SizeDict(**size)
    except (ImportError, TypeError):
        return size


def _check_qlora_possible() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "qlora needs a CUDA GPU (bitsandbytes 4-bit); use mode='lora' on the CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "qlora needs the bitsandbytes package: pip install bitsandbytes (or use mode='lora')"
        ) from e


@dataclass
class ModelFiles:
    """A model's directory, adapter, spec and processor: everything but its weights."""

    path: Path  # the base model's checkpoint directory
    adapter_dir: Path | None  # a LoRA run's final/ or sampler snapshot, if that was named
    spec: ModelSpec
    processor: Any


def resolve_model_files(
    name_or_path: str,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    *,
    revision: str | None = None,
    download: bool = False,
) -> ModelFiles:
    """What ``load_model`` reads besides the weights, resolved as it does (the renderer
    of ``vlmtune data validate --config`` is built from this, without the weights)."""
    path = resolve_model_path(name_or_path, revision=revision, download=download)
    adapter_dir: Path | None = None
    if (path / "adapter_config.json").is_file():  # a LoRA run's final/ or a sampler snapshot
        adapter_dir, path = path, resolve_model_path(adapter_base_name(path), download=download)
    try:
        spec = get_model_spec(str(path) if adapter_dir else name_or_path)
    except UnknownModelError:  # e.g. a cached hub id outside the registry
        spec = spec_from_dir(path)
    # A directory vlmtune (or the user) saved carries the pixel limits it was trained
    # with; the family defaults apply only to registry names and hub ids.
    own_limits = adapter_dir is not None or Path(name_or_path).expanduser().is_dir()
    processor = load_processor(
        adapter_dir or path,
        min_pixels if min_pixels is not None else (None if own_limits else spec.min_pixels),
        max_pixels if max_pixels is not None else (None if own_limits else spec.max_pixels),
    )
    return ModelFiles(path, adapter_dir, spec, processor)


@dataclass(frozen=True)
class ModelRequest:
    """What to load: which checkpoint, and what of it trains (``BuildOptions``: how)."""

    # A built-in or registry name, a hub id, or a directory (a LoRA run's final/ too).
    name_or_path: str
    revision: str | None = None  # branch, tag or commit of a hub id (None: default branch)
    mode: TrainingMode = "full"  # every weight, a LoRA, or a LoRA on 4-bit base weights
    lora: LoraSettings = field(default_factory=LoraSettings)  # a new adapter's shape
    freeze_vision_tower: bool = True  # full: the tower's weights; LoRA: no adapters there
    freeze_projector: bool = True  # the same for the patch and deepstack mergers
    # The image processor's pixel limits; None: a saved directory's own, else the spec's.
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'full', 'lora' or 'qlora', got {self.mode!r}")


@dataclass(frozen=True)
class BuildOptions:
    """How to run the model: where its weights live and how it computes."""

    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False  # recompute activations in backward
    # Read no weights: the same modules (adapters included) on the meta device, for
    # FSDP ranks that receive rank 0's weights after sharding, so that only one
    # process per job holds the whole model in host memory.
    structure_only: bool = False
    download: bool = True  # fetch a hub id missing from the cache (False: refuse)


# One model loads at a time per process. transformers builds a model under a
# process-wide "parameters go on the meta device" patch, so two threads building at once
# (a server rebuilding several runs after a restart) leave meta tensors in each other's
# models ("Cannot copy out of meta tensor"); and its lazy imports race on first use
# ("cannot import name 'AutoProcessor'").
BUILD_LOCK = threading.RLock()


def load_model(request: ModelRequest | str, options: BuildOptions | None = None) -> LoadedModel:
    """Model + processor with what trains set: resolve, build, adapt.

    A bare name loads it for full fine-tuning with the default freezing.
    """
    if isinstance(request, str):
        request = ModelRequest(request)
    options = options or BuildOptions()
    if request.mode == "qlora":
        _check_qlora_possible()  # before reading gigabytes of weights
    with BUILD_LOCK:
        files = resolve_model_files(
            request.name_or_path,
            request.min_pixels,
            request.max_pixels,
            revision=request.revision,
            download=options.download,
        )
        requested = (
            adapter_base_name(files.adapter_dir) if files.adapter_dir else request.name_or_path
        )
        base_name = portable_base_name(files.spec, files.path, requested)
        model = build_model(files.path, request.mode, options)
        model = adapt_model(model, request, files.adapter_dir, options, base_name)
    return LoadedModel(model, files.processor, files.spec, files.path, request.mode, base_name)


def build_model(path: Path, mode: TrainingMode, options: BuildOptions) -> nn.Module:
    """The checkpoint's model as ``options`` place it (qlora: 4-bit language weights)."""
    with BUILD_LOCK:
        return _build_model(path, mode, options)


def _build_model(path: Path, mode: TrainingMode, options: BuildOptions) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    if options.structure_only:
        if mode == "qlora":
            raise ValueError("qlora models cannot be built without their weights")
        model = _build_on_meta(path, options.dtype, options.attn_implementation)
        linear_patch_projection(model)  # the same modules on every rank (FSDP)
        return model
    kwargs: dict[str, Any] = {
        "dtype": options.dtype,
        "attn_implementation": options.attn_implementation,
    }
    if mode == "qlora":
        kwargs.update(_qlora_kwargs(options))
    model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    if mode != "qlora":  # bitsandbytes placed it already
        # transformers wraps ``to`` in functools.wraps, which mypy takes for an unbound method
        model.to(options.device)  # type: ignore[arg-type]
    linear_patch_projection(model)  # why: models/_compat.py
    return model


def _qlora_kwargs(options: BuildOptions) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    compute_dtype = options.dtype if options.dtype != torch.float32 else torch.bfloat16
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # The vision tower and projector stay in full precision.
        llm_int8_skip_modules=["visual", "lm_head"],
    )
    return {
        "quantization_config": quantization,
        "device_map": {"": torch.device(options.device).index or 0},
    }


def adapt_model(
    model: nn.Module,
    request: ModelRequest,
    adapter_dir: Path | None,
    options: BuildOptions,
    base_name: str,
) -> nn.Module:
    """Set what trains: the unfrozen parts (full), a new LoRA, or the saved adapter in
    ``adapter_dir``: trained on (lora, qlora) or merged into the weights (full)."""
    # qlora's checkpointing comes from prepare_model_for_kbit_training.
    checkpointing = options.gradient_checkpointing and request.mode != "qlora"
    if adapter_dir is not None and request.mode != "full":
        model = attach_adapter(model, adapter_dir, structure_only=options.structure_only)
        if checkpointing:
            _enable_checkpointing(model)
        return model
    # On the meta device a merged adapter leaves the base model's structure: nothing to do.
    if adapter_dir is not None and not options.structure_only:
        model = merge_adapter(model, adapter_dir)
    if checkpointing:
        _enable_checkpointing(model)
    if request.mode == "full":
        set_trainable(model, request.freeze_vision_tower, request.freeze_projector)
        return model
    if request.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        freeze(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=options.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return apply_lora(
        model, request.lora, request.freeze_vision_tower, request.freeze_projector, base_name
    )


def _build_on_meta(path: Path, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The checkpoint's model with every parameter and buffer on the meta device."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )


def _enable_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing needs no input-grad hook when the embeddings are frozen.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False


def set_trainable(model: nn.Module, freeze_vision_tower: bool, freeze_projector: bool) -> None:
    """Full fine-tuning: everything trains except the frozen vision tower / projector."""
    for name, p in model.named_parameters():
        if name.startswith(PROJECTOR_PREFIXES):
            p.requires_grad_(not freeze_projector)
        elif name.startswith(VISION_PREFIX):
            p.requires_grad_(not freeze_vision_tower)
        else:
            p.requires_grad_(True)


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
