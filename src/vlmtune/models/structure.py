"""The parts of a Qwen3-VL model (dense or MoE) that the engine reaches into, as types.

transformers types these attributes loosely (``Any``, or ``nn.Module.__getattr__``'s
``Tensor | Module``; ``config.vision_config`` is ``dict | PreTrainedConfig | None``), so
each protocol below names only what vlmtune uses, and ``as_vl_model`` is the one place
a loaded model is taken to have this shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, cast

import torch
from torch import nn


class VisionConfig(Protocol):
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int


class VLConfig(Protocol):
    image_token_id: int
    vision_config: VisionConfig


class ImageFeatures(Protocol):
    """``get_image_features(..., return_dict=True)``'s output."""

    pooler_output: Sequence[torch.Tensor]  # one (tokens, H) tensor per image
    deepstack_features: Sequence[torch.Tensor]  # one per deepstack layer


class BackboneOutput(Protocol):
    last_hidden_state: torch.Tensor  # (B, T, H)


class VisionTower(Protocol):
    blocks: nn.ModuleList

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class LanguageModel(Protocol):
    layers: nn.ModuleList


class VLBackbone(Protocol):
    """``Qwen3VLModel`` (or ``Qwen3VLMoeModel``): vision tower + language model."""

    config: VLConfig
    visual: VisionTower
    language_model: LanguageModel

    def get_input_embeddings(self) -> nn.Embedding: ...

    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None, **kwargs: Any
    ) -> ImageFeatures: ...

    def __call__(self, **kwargs: Any) -> BackboneOutput: ...


class GenerateOutput(Protocol):
    """``generate(..., return_dict_in_generate=True, output_logits=True)``'s output."""

    sequences: torch.Tensor  # (B, prompt + new tokens)
    logits: tuple[torch.Tensor, ...]  # one (B, V) per new token


class VLModel(Protocol):
    """``Qwen3VLForConditionalGeneration`` (or the MoE one), without a peft wrapper."""

    config: VLConfig
    model: VLBackbone
    lm_head: nn.Linear
    # transformers' generate() keeps every rank stepping until all are done when set.
    _is_fsdp_managed_module: bool

    def get_input_embeddings(self) -> nn.Embedding: ...

    def generate(self, **kwargs: Any) -> GenerateOutput: ...


def as_vl_model(hf_model: nn.Module) -> VLModel:
    """``hf_model`` as the Qwen3-VL structure: the registry loads only Qwen3-VL models."""
    return cast(VLModel, hf_model)
