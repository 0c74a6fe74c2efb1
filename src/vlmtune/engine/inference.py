"""An engine to sample from a saved model: what the server's samplers and chat, and a
local-model collection policy, load."""

from __future__ import annotations

from pathlib import Path

from vlmtune.engine.config import EngineConfig
from vlmtune.engine.engine import TrainingEngine


def load_inference_engine(model_dir: str | Path, base_model: str | None = None) -> TrainingEngine:
    """An engine for a base model name, a full model directory, or a LoRA adapter directory.

    An adapter is merged into its base in memory: sampling then costs what the base does.
    The adapter directory's processor files carry the run's pixel limits, so images get
    the token counts they were trained with.
    """
    from vlmtune.models.adapters import adapter_base_name, merge_adapter
    from vlmtune.models.loading import LoadedModel, load_model, load_processor

    path = Path(model_dir)
    if not (path / "adapter_config.json").is_file():
        return TrainingEngine(EngineConfig(base_model=str(model_dir), mode="full", lora_rank=0))
    base = base_model or adapter_base_name(path)
    loaded = load_model(base)
    model = merge_adapter(loaded.model, path)
    model.requires_grad_(False)
    processor = load_processor(path)
    merged = LoadedModel(
        model=model,
        processor=processor,
        spec=loaded.spec,
        path=path,
        mode="full",
        base_name=loaded.base_name,
    )
    return TrainingEngine(EngineConfig(base_model=base, mode="full", lora_rank=0), loaded=merged)
