"""Models layer: family registry, loading (full / LoRA / QLoRA), vision preprocessing,
and the built-in tiny Qwen3-VL. Heavy imports (torch, transformers) happen on use."""

from vlmtune.models.registry import ModelSpec, UnknownModelError, get_model_spec, list_models
from vlmtune.models.tiny import TINY_MODEL_NAME, tiny_model_dir

__all__ = [
    "TINY_MODEL_NAME",
    "ModelSpec",
    "UnknownModelError",
    "get_model_spec",
    "list_models",
    "tiny_model_dir",
]
