"""Servable model directories: a full model or a LoRA adapter, with the processor files,
written atomically; and an adapter folded into a full directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtune.atomic import atomic_dir
from vlmtune.models.adapters import adapter_base_name, is_peft_model, merge_adapter
from vlmtune.models.loading import BUILD_LOCK, LoadedModel, load_processor, resolve_model_path


def save_model_dir(
    loaded_or_model: LoadedModel | nn.Module,
    processor: Any,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a servable directory atomically: full weights or LoRA adapter, plus processor.

    Full: loads with ``AutoModelForImageTextToText.from_pretrained(out_dir)``.
    Adapter: ``adapter_config.json``'s ``base_model_name_or_path`` is a hub id or an
    absolute directory (``LoadedModel.base_name``), so transformers' peft integration
    loads base and adapter alone: ``AutoModelForImageTextToText.from_pretrained(out_dir)``
    (or ``PeftModel.from_pretrained(base, out_dir)``); ``merge_adapter_to_dir`` folds
    it into a full directory. Both carry the processor files.

    ``state_dict`` replaces the model's own tensors (a sharded model's weights,
    gathered on one rank); an adapter's may hold just the trainable weights.
    ``dtype`` is what the config records when ``state_dict`` holds a different dtype
    from the model's (transformers writes the model's).
    """
    model = loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model
    with atomic_dir(out_dir) as tmp:
        if is_peft_model(model):
            if isinstance(loaded_or_model, LoadedModel):
                for cfg in model.peft_config.values():
                    cfg.base_model_name_or_path = loaded_or_model.base_name
            # peft reads an optional ``state_dict`` from its **kwargs.
            extra: dict[str, Any] = {} if state_dict is None else {"state_dict": state_dict}
            # save_embedding_layers="auto" would look the base model up on the Hub (a
            # network call); adapters never target the embeddings, so there is nothing to check.
            model.save_pretrained(
                str(tmp), safe_serialization=True, save_embedding_layers=False, **extra
            )
        else:
            from transformers import PreTrainedModel

            if not isinstance(model, PreTrainedModel):
                raise TypeError(f"cannot save a {type(model).__name__}: not a transformers model")
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            if dtype is not None:
                _set_config_dtype(tmp / "config.json", dtype)
        processor.save_pretrained(str(tmp))
    return Path(out_dir)


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Set ``dtype`` in a saved config.json and in each sub-config that records one."""
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    for sub in config.values():
        if isinstance(sub, dict) and "dtype" in sub:
            sub["dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_adapter_to_dir(
    adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None
) -> Path:
    """Fold a LoRA adapter into its base model and write a full model directory."""
    from transformers import AutoModelForImageTextToText

    adapter_dir = Path(adapter_dir)
    base_path = resolve_model_path(base or adapter_base_name(adapter_dir))
    with BUILD_LOCK:  # one model built at a time per process (see BUILD_LOCK)
        model = AutoModelForImageTextToText.from_pretrained(str(base_path), dtype=torch.float32)
        merged = merge_adapter(model, adapter_dir)
    # The adapter dir's processor carries the run's pixel limits; fall back to the base's.
    processor_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    processor = load_processor(processor_src)
    return save_model_dir(merged, processor, out_dir)
