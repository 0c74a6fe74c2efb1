"""The patch convolution as a matrix product (models/_compat.py): same numbers, same
gradients, same checkpoint keys and shapes, on the tiny model as loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from vlmtune.models._compat import PatchProjection, is_patch_convolution, linear_patch_projection
from vlmtune.models.loading import BuildOptions, load_model


def test_patch_projection_equals_the_convolution_and_its_gradients() -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=True)
    x_N_C_T_P_P = torch.randn(5, 3, 2, 4, 4)
    expected = conv(x_N_C_T_P_P)
    expected.square().sum().backward()
    grads = [conv.weight.grad.clone(), conv.bias.grad.clone()]
    conv.zero_grad()

    proj = PatchProjection(conv)
    got = proj(x_N_C_T_P_P)
    got.square().sum().backward()
    assert got.shape == expected.shape == (5, 8, 1, 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.bias.grad, grads[1], rtol=1e-5, atol=1e-5)
    assert proj.weight is conv.weight  # the same parameter: nothing copied


def test_only_non_overlapping_patch_convolutions_qualify() -> None:
    assert is_patch_convolution(nn.Conv3d(3, 8, kernel_size=2, stride=2))
    assert not is_patch_convolution(nn.Conv3d(3, 8, kernel_size=2, stride=1))  # overlapping
    assert not is_patch_convolution(nn.Conv3d(3, 8, kernel_size=2, stride=2, padding=1))
    assert not is_patch_convolution(nn.Conv3d(4, 8, kernel_size=2, stride=2, groups=2))
    assert not is_patch_convolution(nn.Linear(3, 8))
    assert not is_patch_convolution(None)
    model = nn.Module()
    model.patch_embed = nn.Module()
    model.patch_embed.proj = nn.Conv3d(3, 8, kernel_size=2, stride=1)
    assert linear_patch_projection(model) == 0  # left as it is


@pytest.mark.parametrize("structure_only", [False, True])
def test_loaded_model_keeps_the_checkpoint_layout(tiny_dir: Path, structure_only: bool) -> None:
    model = load_model("tiny-qwen3-vl", BuildOptions(structure_only=structure_only)).model
    assert isinstance(model.model.visual.patch_embed.proj, PatchProjection)
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    key = "model.visual.patch_embed.proj.weight"
    assert state[key] == saved[key] == (128, 3, 2, 16, 16)
    assert set(state) == set(saved) | {"lm_head.weight"}  # the tied head is not saved


def test_vision_tower_matches_transformers_own_module(tiny_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText

    ours = load_model("tiny-qwen3-vl").model.model.visual
    theirs = AutoModelForImageTextToText.from_pretrained(str(tiny_dir)).model.visual
    assert isinstance(theirs.patch_embed.proj, nn.Conv3d)
    torch.manual_seed(0)
    grid_thw = torch.tensor([[1, 4, 6]])  # one 64x96 image: 24 patches
    pixels = torch.randn(24, 3 * 2 * 16 * 16)
    with torch.no_grad():
        out_ours, out_theirs = ours(pixels, grid_thw=grid_thw), theirs(pixels, grid_thw=grid_thw)
    torch.testing.assert_close(
        out_ours.pooler_output, out_theirs.pooler_output, rtol=1e-5, atol=1e-5
    )
