"""Model family registry: what vlmtune knows about each supported Qwen3-VL SKU.

Parameter counts and shapes are the published figures (rounded); they are for display,
GPU planning and sanity checks, never for building a model (the checkpoint's own
config.json does that).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from vlmtune.models.tiny import (
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    TINY_MODEL_NAME,
    TINY_MOE_MODEL_NAME,
)

# Training defaults for real checkpoints, in pixels with Qwen3-VL's 32-px merged patch
# (patch 16 x merge 2): at least 64 image tokens (the processor's own minimum, 256x256)
# and at most 1,280 (the processor allows 16,384, far beyond what training batches hold).
DEFAULT_MIN_PIXELS = 64 * 32 * 32
DEFAULT_MAX_PIXELS = 1280 * 32 * 32

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


@dataclass(frozen=True)
class ModelSpec:
    """One model SKU. ``min_gpus`` is the fewest 80 GB GPUs for LoRA in bf16 (0: CPU is fine)."""

    name: str
    processor_id: str
    params: int
    active_params: int
    is_moe: bool = False
    supports_vision: bool = True
    max_images_per_message: int | None = 1
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_gpus: int = 1
    hidden_size: int | None = None
    num_layers: int | None = None
    aliases: tuple[str, ...] = ()

    def check_fits(self, gpu_count: int) -> str | None:
        """None if ``gpu_count`` GPUs are enough, else a message saying how many are needed."""
        if gpu_count >= self.min_gpus:
            return None
        plural = "GPU" if self.min_gpus == 1 else "GPUs"
        return (
            f"{self.name} needs at least {self.min_gpus} {plural} (80 GB class) "
            f"and {gpu_count} {'is' if gpu_count == 1 else 'are'} available"
        )


def _qwen(
    size: str,
    params: float,
    *,
    active: float | None = None,
    hidden: int,
    layers: int,
    min_gpus: int = 1,
) -> ModelSpec:
    name = f"Qwen/Qwen3-VL-{size}-Instruct"
    short = f"qwen3-vl-{size.lower()}"
    return ModelSpec(
        name=name,
        processor_id=name,
        params=int(params * 1e9),
        active_params=int((active if active is not None else params) * 1e9),
        is_moe=active is not None,
        min_gpus=min_gpus,
        hidden_size=hidden,
        num_layers=layers,
        aliases=(short, f"{short}-instruct", f"Qwen3-VL-{size}-Instruct"),
    )


TINY_SPEC = ModelSpec(
    name=TINY_MODEL_NAME,
    processor_id=TINY_MODEL_NAME,
    params=21_716_224,  # 19,447,808 of them the (tied) 151,936 x 128 embedding
    active_params=21_716_224,
    min_pixels=TINY_MIN_PIXELS,
    max_pixels=TINY_MAX_PIXELS,
    min_gpus=0,
    hidden_size=128,
    num_layers=4,
    aliases=("tiny",),
)

# The MoE tiny: 786,432 expert weights, half of them active per token.
TINY_MOE_SPEC = replace(
    TINY_SPEC,
    name=TINY_MOE_MODEL_NAME,
    processor_id=TINY_MOE_MODEL_NAME,
    params=21_718_272,
    active_params=21_325_056,
    is_moe=True,
    aliases=("tiny-moe",),
)

_SPECS: tuple[ModelSpec, ...] = (
    _qwen("2B", 2.13, hidden=2048, layers=28),
    _qwen("4B", 4.44, hidden=2560, layers=36),
    _qwen("8B", 8.77, hidden=4096, layers=36),
    _qwen("32B", 33.4, hidden=5120, layers=64),
    _qwen("30B-A3B", 31.1, active=3.3, hidden=2048, layers=48),
    # 236B bf16 weights are ~470 GB: LoRA needs the weights sharded over 8 x 80 GB.
    _qwen("235B-A22B", 236.0, active=22.0, hidden=4096, layers=94, min_gpus=8),
    TINY_SPEC,
    TINY_MOE_SPEC,
)

# Hosted fine-tuning services name the same checkpoints by resource name: the one table
# from those names to Hugging Face ids (get_model_spec and resolve_model_path read it).
HOSTED_PREFIX = "accounts/fireworks/models/"
HOSTED_MODEL_NAMES: dict[str, str] = {
    f"{HOSTED_PREFIX}qwen3-vl-2b-instruct": "Qwen/Qwen3-VL-2B-Instruct",
    f"{HOSTED_PREFIX}qwen3-vl-4b-instruct": "Qwen/Qwen3-VL-4B-Instruct",
    f"{HOSTED_PREFIX}qwen3-vl-8b-instruct": "Qwen/Qwen3-VL-8B-Instruct",
    f"{HOSTED_PREFIX}qwen3-vl-32b-instruct": "Qwen/Qwen3-VL-32B-Instruct",
    f"{HOSTED_PREFIX}qwen3-vl-30b-a3b-instruct": "Qwen/Qwen3-VL-30B-A3B-Instruct",
    f"{HOSTED_PREFIX}qwen3-vl-235b-a22b-instruct": "Qwen/Qwen3-VL-235B-A22B-Instruct",
}

_BY_KEY: dict[str, ModelSpec] = {}
for _spec in _SPECS:
    for _key in (_spec.name, *_spec.aliases):
        _BY_KEY[_key.lower()] = _spec
for _hosted, _hf_id in HOSTED_MODEL_NAMES.items():
    _BY_KEY[_hosted] = _BY_KEY[_hf_id.lower()]

# A Hugging Face repo id: owner/name (huggingface_hub validates the details).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class UnknownModelError(KeyError):
    """No registry entry or loadable Qwen3-VL directory for a name."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else ""


def list_models() -> list[ModelSpec]:
    return list(_SPECS)


def hub_id(name: str) -> str | None:
    """The Hugging Face repo a name stands for: a registry name or alias, a hosted
    service's resource name, or an ``owner/name`` id as it is; None otherwise (the tiny
    models are built locally, never fetched)."""
    spec = _BY_KEY.get(name.strip().lower())
    if spec is not None:
        return spec.name if "/" in spec.name else None
    return name.strip() if _HUB_ID.fullmatch(name.strip()) else None


def known_names_hint(name: str) -> str:
    """The names a user could have meant, for an error message about ``name``."""
    if name.strip().lower().startswith("accounts/"):
        return "hosted names vlmtune maps: " + ", ".join(HOSTED_MODEL_NAMES)
    known = ", ".join(s.name for s in _SPECS)
    return f"expected one of {known} (or a short alias such as 'qwen3-vl-8b')"


def hosted_name(name: str) -> str | None:
    """The hosted service's resource name for a registry model (``Qwen/Qwen3-VL-8B-Instruct``
    or an alias of it -> ``accounts/fireworks/models/qwen3-vl-8b-instruct``); None if it
    has none (the tiny models, local directories)."""
    spec = _BY_KEY.get(name.strip().lower())
    if spec is None:
        return None
    return next((h for h, hf in HOSTED_MODEL_NAMES.items() if hf == spec.name), None)


def same_model(a: str, b: str) -> bool:
    """Whether two names mean one registry model (``qwen3-vl-8b``, its hub id and its
    hosted name do), or are the same name."""
    spec_a = _BY_KEY.get(a.strip().lower())
    return a.strip().lower() == b.strip().lower() or (
        spec_a is not None and spec_a is _BY_KEY.get(b.strip().lower())
    )


def parse_model_alias(text: str) -> tuple[str, str]:
    """``NAME=TARGET`` (``vlmtune serve --model-alias``) as (name, target), or ValueError.

    The name is matched case-insensitively, as registry names are; the target is any
    model reference this machine resolves (a registry name, a hub id, a directory)."""
    name, sep, target = text.partition("=")
    name, target = name.strip(), target.strip()
    if not sep or not name or not target:
        raise ValueError(
            f"{text!r}: expected NAME=PATH (e.g. {HOSTED_PREFIX}qwen3-vl-8b-instruct=tiny-qwen3-vl)"
        )
    return name, target


def aliased(name: str, aliases: dict[str, str]) -> str:
    """What ``name`` means under ``aliases`` (keys lower-cased): its target, or itself."""
    return aliases.get(name.strip().lower(), name)


def get_model_spec(name_or_path: str) -> ModelSpec:
    """Look a model up by id (case-insensitive), short alias, hosted resource name
    (``accounts/fireworks/models/...``), or local checkpoint directory."""
    spec = _BY_KEY.get(name_or_path.strip().lower())
    if spec is not None:
        return spec
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return spec_from_dir(path)
    raise UnknownModelError(
        f"unknown model {name_or_path!r}: {known_names_hint(name_or_path)}, or a local "
        "Qwen3-VL checkpoint directory containing config.json"
    )


def spec_from_dir(path: Path) -> ModelSpec:
    """A spec for a local checkpoint: a known SKU's if recognisable, else derived from files."""
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnknownModelError(
            f"{path} has model_type {model_type!r}; vlmtune supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    known = _known_spec_for_dir(path)
    min_px, max_px = _dir_pixel_limits(path, known)
    if known is not None:
        return replace(known, min_pixels=min_px, max_pixels=max_px)
    text = config.get("text_config") or {}
    is_moe = model_type == "qwen3_vl_moe"
    total, expert = _count_safetensors_params(path)
    active = total
    if is_moe and text.get("num_experts"):
        # Each token runs num_experts_per_tok of num_experts experts.
        active = total - int(
            expert * (1 - text.get("num_experts_per_tok", 1) / text["num_experts"])
        )
    return ModelSpec(
        name=str(path),
        processor_id=str(path),
        params=total,
        active_params=active,
        is_moe=is_moe,
        min_pixels=min_px,
        max_pixels=max_px,
        min_gpus=1 if total > 1e9 else 0,
        hidden_size=text.get("hidden_size"),
        num_layers=text.get("num_hidden_layers"),
    )


def _known_spec_for_dir(path: Path) -> ModelSpec | None:
    marker = path / "vlmtune_tiny.json"
    if marker.is_file():
        name = json.loads(marker.read_text()).get("name")
        return TINY_MOE_SPEC if name == TINY_MOE_MODEL_NAME else TINY_SPEC
    # A Hugging Face cache snapshot: .../models--Qwen--Qwen3-VL-8B-Instruct/snapshots/<sha>
    for part in path.resolve().parts:
        m = re.fullmatch(r"models--(.+?)--(.+)", part)
        if m:
            return _BY_KEY.get(f"{m.group(1)}/{m.group(2)}".lower())
    return None


def _dir_pixel_limits(path: Path, known: ModelSpec | None) -> tuple[int, int]:
    """The checkpoint's processor minimum, and its maximum capped at the training default."""
    default_min = known.min_pixels if known else DEFAULT_MIN_PIXELS
    default_max = known.max_pixels if known else DEFAULT_MAX_PIXELS
    size: dict = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = path / name
        if f.is_file():
            data = json.loads(f.read_text())
            size = (data.get("image_processor") or data).get("size") or {}
            break
    min_px = int(size.get("shortest_edge") or default_min)
    max_px = min(int(size.get("longest_edge") or default_max), default_max)
    return min_px, max(max_px, min_px)


def _count_safetensors_params(path: Path) -> tuple[int, int]:
    """(all parameters, expert parameters) from the safetensors headers, without loading."""
    total = expert = 0
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in meta["shape"]:
                count *= dim
            total += count
            if ".experts." in key:
                expert += count
    return total, expert
