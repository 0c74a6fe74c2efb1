"""What a client may ask of a run's configuration, checked before any engine is built.

``engine_config`` turns a ``create_model`` request (base model, LoRA rank, the
``engine`` settings a client may set) into an ``EngineConfig``; ``model_pixels`` says
which model files and pixel limits that config means; checkpoint names and saved
states are checked here too. Every refusal is a ``BadRequest`` naming the setting.
"""

from __future__ import annotations

import functools
import json
import re
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pydantic

from vlmtune.engine.engine import RUN_SETTINGS, EngineConfig
from vlmtune.protocol.errors import BadRequest
from vlmtune.types import mode_for

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# EngineConfig fields a client may set when creating a run: the SDK sends the same list
# (device, sharding and disk paths are the server's; mode follows lora_rank).
CLIENT_ENGINE_KEYS = RUN_SETTINGS
# Config fields that must agree for one run to load another's saved state.
STATE_KEYS = ("base_model", "mode", "lora_rank", "lora_alpha", "target_modules",
              "freeze_vision_tower", "freeze_projector")  # fmt: skip


def model_pixels(config: EngineConfig) -> tuple[Path, int, int]:
    """(model directory, effective min_pixels, max_pixels): what the engine will use."""
    from vlmtune.models.loading import resolve_model_path
    from vlmtune.models.registry import UnknownModelError, get_model_spec, spec_from_dir

    path = resolve_model_path(config.base_model)
    try:
        spec = get_model_spec(config.base_model)
    except UnknownModelError:
        spec = spec_from_dir(path)
    lo = config.min_pixels if config.min_pixels is not None else spec.min_pixels
    hi = config.max_pixels if config.max_pixels is not None else spec.max_pixels
    return path, lo, hi


def engine_config(base_model: str, lora_rank: int, overrides: dict | None) -> EngineConfig:
    """The run a client asks for, or ``BadRequest`` naming the setting at fault."""
    from vlmtune.models.loading import ModelNotFoundError
    from vlmtune.models.registry import UnknownModelError

    unknown = sorted(set(overrides or {}) - set(CLIENT_ENGINE_KEYS))
    if unknown:
        raise BadRequest(
            f"engine: unknown settings {unknown} (allowed: {list(CLIENT_ENGINE_KEYS)})"
        )
    mode = mode_for(lora_rank)
    config = EngineConfig(base_model=base_model, mode=mode, lora_rank=lora_rank or 16)
    for key, value in (overrides or {}).items():
        setattr(config, key, checked_setting(key, value))
    cap = config.max_images_per_message  # None (the family's) skipped the check above
    if cap is not None and (type(cap) is not int or cap < 0):
        raise BadRequest(
            "engine.max_images_per_message: expected an integer >= 0 (0: no cap) or null "
            f"(the model family's cap), got {cap!r}"
        )
    try:
        _, lo, hi = model_pixels(config)
    except (UnknownModelError, ModelNotFoundError, FileNotFoundError, ValueError) as e:
        raise BadRequest(f"base_model {base_model!r}: {e}") from None
    if not 0 < lo <= hi:
        raise BadRequest(f"engine: need 0 < min_pixels <= max_pixels (got {lo}, {hi})")
    return config


def check_compatible(config: EngineConfig, state_dir: Path) -> None:
    saved = json.loads((state_dir / "state.json").read_text())["engine"]
    mine = asdict(config)
    diff = [k for k in STATE_KEYS if saved.get(k) != mine.get(k)]
    if diff:
        raise BadRequest(
            "checkpoint was saved by a run with different "
            + ", ".join(f"{k} ({saved.get(k)!r} vs {mine.get(k)!r})" for k in diff)
        )


@functools.cache
def _setting_type(key: str) -> tuple[pydantic.TypeAdapter, str]:
    hint = typing.get_type_hints(EngineConfig)[key]
    name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    return pydantic.TypeAdapter(hint), name


def checked_setting(key: str, value: Any) -> Any:
    """``value`` if it has the type of ``EngineConfig.<key>`` (strict: "8" is no int)."""
    adapter, name = _setting_type(key)
    try:
        value = adapter.validate_python(value, strict=True)
    except pydantic.ValidationError:
        raise BadRequest(f"engine.{key}: expected {name}, got {value!r}") from None
    if key in ("micro_batch_size", "max_row_tokens", "lora_alpha") and value < 1:
        raise BadRequest(f"engine.{key}: expected an integer >= 1, got {value!r}")
    return value


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or ".." in name:
        raise BadRequest(f"checkpoint name {name!r}: use 1-128 of A-Z a-z 0-9 . _ - (no slashes)")
