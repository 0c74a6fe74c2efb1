"""LoRA adapters: which linears get one, attaching a new or saved adapter, and the one
merge of an adapter into its base weights.

Every path that folds an adapter in (loading a LoRA checkpoint for full fine-tuning or
inference, ``vlmtune export --merge``, the server's sampler) goes through
``merge_adapter``, so they all get the same weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeGuard

from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel

# Module-name prefixes inside Qwen3VLForConditionalGeneration (transformers 5).
LANGUAGE_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."
# The projector: the final patch merger and the deepstack mergers that feed the LLM.
PROJECTOR_PREFIXES = ("model.visual.merger.", "model.visual.deepstack_merger_list.")

TargetModules = list[str] | Literal["all-linear"]


@dataclass(frozen=True)
class LoraSettings:
    """A new adapter's shape (a saved adapter keeps its own)."""

    r: int = 16  # rank of the A/B factors
    alpha: int = 32  # scale: the update is (alpha / r) * B @ A
    dropout: float = 0.0  # dropout on the adapter's input
    # Leaf names of the linears that get adapters ("q_proj", ...), or every linear of
    # the parts that train ("all-linear").
    target_modules: TargetModules = field(default="all-linear")


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def apply_lora(
    model: nn.Module,
    lora: LoraSettings,
    freeze_vision_tower: bool,
    freeze_projector: bool,
    base_name: str,
) -> nn.Module:
    """Freeze ``model`` and wrap it in a new peft LoRA that records ``base_name``."""
    from peft import LoraConfig, get_peft_model

    freeze(model)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_regex(
            model, lora.target_modules, freeze_vision_tower, freeze_projector
        ),
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def attach_adapter(model: nn.Module, adapter_dir: Path, *, structure_only: bool) -> nn.Module:
    """Freeze ``model`` and attach the saved adapter to keep training it (its rank and
    targets win over any ``LoraSettings``). ``structure_only``: the adapter's modules
    without its weights, for a meta-device model that receives them later."""
    from peft import LoraConfig, PeftModel, get_peft_model

    freeze(model)
    if structure_only:
        config = LoraConfig.from_pretrained(str(adapter_dir))
        config.inference_mode = False
        return get_peft_model(model, config)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def merge_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """``model`` with the saved adapter folded into its weights: a plain HF model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def adapter_base_name(adapter_dir: Path) -> str:
    """The base model an adapter directory names (``base_model_name_or_path``)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model")
    return str(base)


def is_peft_model(model: nn.Module) -> TypeGuard[PeftModel]:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes' Linear4bit subclasses nn.Linear, but check by name to not import it.
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def lora_target_regex(
    model: nn.Module,
    target_modules: TargetModules,
    freeze_vision_tower: bool,
    freeze_projector: bool,
) -> str:
    """A peft ``target_modules`` regex naming exactly the linears that get adapters.

    peft's own "all-linear" would also adapt the vision tower; listing modules by name
    keeps a frozen tower adapter-free. Layer indices are folded into ``\\d+`` so the
    pattern stays short for 94-layer models. ``lm_head`` never gets an adapter.
    """
    patterns: set[str] = set()
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        if name.startswith(PROJECTOR_PREFIXES):
            if freeze_projector:
                continue
        elif name.startswith(VISION_PREFIX):
            if freeze_vision_tower:
                continue
        elif not name.startswith(LANGUAGE_PREFIX):
            continue  # lm_head and anything outside the three parts
        leaf = name.rsplit(".", 1)[-1]
        if target_modules != "all-linear" and leaf not in target_modules:
            continue
        patterns.add(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)))
    if not patterns:
        raise ValueError(f"no linear layer matches target_modules={target_modules!r}")
    return "^(" + "|".join(sorted(patterns)) + ")$"
