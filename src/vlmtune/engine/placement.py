"""Where and in what precision the engine runs, where its model is loaded, and which
module is the HF model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlmtune.engine.config import EngineConfig
from vlmtune.models.adapters import LoraSettings
from vlmtune.models.loading import BuildOptions, LoadedModel, ModelRequest, load_model

if TYPE_CHECKING:
    from vlmtune.engine.distributed import DistInfo


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(
    precision: str, device: torch.device, bf16_supported: bool | None = None
) -> torch.dtype:
    """``auto``: bf16 on a CUDA device that supports it, else fp32 (CPU bf16 matmuls are
    slow and lossy). ``bf16_supported``: whether the GPU has bf16 (None: ask CUDA)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type != "cuda":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float32


def unwrap_hf(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForConditionalGeneration`` under a peft wrapper (adapters stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def duplicate_param_names(model: torch.nn.Module) -> list[str]:
    seen: set[int] = set()
    duplicates = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            duplicates.append(name)
        seen.add(id(p))
    return duplicates


def load_placed(
    config: EngineConfig, dist: DistInfo, device: torch.device, dtype: torch.dtype, sharded: bool
) -> LoadedModel:
    """The engine's model, loaded where its placement needs it.

    One process, or replicated ranks: the whole model on ``device`` in ``dtype``.
    Sharded (FSDP): full fine-tuning keeps fp32 master weights (FSDP computes in
    ``dtype``); rank 0 reads the weights into host memory and the other ranks build the
    model on the meta device. After sharding rank 0 broadcasts them
    (``distributed.shard_and_load``), so no GPU and no other process holds the whole
    model.
    """
    load_dtype, load_device = dtype, device
    if sharded:
        load_device = torch.device("cpu")
        if config.mode == "full":
            load_dtype = torch.float32
    request = ModelRequest(
        config.base_model,
        revision=config.revision,
        mode=config.mode,
        lora=LoraSettings(
            config.lora_rank, config.lora_alpha, config.lora_dropout, config.target_modules
        ),
        freeze_vision_tower=config.freeze_vision_tower,
        freeze_projector=config.freeze_projector,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
    )
    options = BuildOptions(
        dtype=load_dtype,
        device=str(load_device),
        attn_implementation=config.attention,
        gradient_checkpointing=config.gradient_checkpointing,
        structure_only=sharded and not dist.is_main,
    )
    return load_model(request, options)
