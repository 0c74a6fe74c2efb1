"""Where and in what precision the engine runs, and which module is the HF model."""

from __future__ import annotations

import torch


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
