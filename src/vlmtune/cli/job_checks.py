"""Checks of a job against its files, made before any data or model work: the data
files exist and hold something, and ``lora.target_modules`` names layers the model has."""

from __future__ import annotations

from pathlib import Path

from vlmtune.config import JobFile


def data_file_problems(key: str, value: str | None) -> list[str]:
    """A data file that is missing, a folder or empty, found before the model loads."""
    if value is None:
        return []
    path = Path(value)
    if path.is_dir():
        return [f"{key}: {value} is a folder, not a JSONL file"]
    if not path.is_file():
        return [f"{key}: {value} does not exist"]
    if path.stat().st_size == 0:
        return [f"{key}: {value} is empty (0 bytes): nothing to train on"]
    return []


def lora_target_problems(job: JobFile) -> list[str]:
    """``lora.target_modules`` that name no linear of the parts that train, found from a
    meta-device model built from config.json, before any weights load.

    Skipped where only a download would tell (an uncached hub id) and for a saved
    adapter, whose own targets win over ``[lora]``.
    """
    from vlmtune.models.adapters import lora_target_regex
    from vlmtune.models.loading import (
        BuildOptions,
        ModelNotFoundError,
        build_model,
        resolve_model_path,
    )

    try:
        path = resolve_model_path(job.job.model, revision=job.job.revision)
    except (ModelNotFoundError, ValueError):  # uncached (ModelNotCachedError) or reported
        return []
    if (path / "adapter_config.json").is_file() or not (path / "config.json").is_file():
        return []
    model = build_model(path, "full", BuildOptions(structure_only=True))
    m = job.model
    try:
        lora_target_regex(model, job.lora.target_modules, m.freeze_vision_tower, m.freeze_projector)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if _linear(mod)})
        return [f"lora.target_modules: {e}; this model's linear layers: {', '.join(names)}"]
    return []


def _linear(module: object) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear)
