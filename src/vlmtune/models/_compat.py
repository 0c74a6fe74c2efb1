"""Where vlmtune changes a transformers model after building it, and why.

The one change: Qwen3-VL's vision patch embedding is an ``nn.Conv3d`` whose kernel
equals its stride, so each output is one patch's pixels times one matrix: a linear map
written as a convolution. PyTorch runs it through convolution kernels (im2col, or
cuDNN's slow paths for this shape: transformers issue 45750 measured it thousands of
times slower on some GPUs in bf16), and on the CPU its forward and backward were 19% of
a training step on 128-896 px images (``benchmarks/packed_vs_unpacked.py --profile``);
as one ``F.linear`` it is ~9x faster and agrees to fp32 round-off.

``linear_patch_projection`` swaps the module on this one model instance for
``PatchProjection``, which holds the *same* parameters in the checkpoint's own layout
(``proj.weight`` stays ``(D, C, T, P, P)``): state dicts, saved models, adapters, FSDP
sharding and resumed checkpoints are unchanged, and nothing global is patched.

transformers >= 5.x offers the same as an opt-in (``from_pretrained(...,
fusion_config={"patch_embeddings": True})``, PR 45041), but through process-wide class
and checkpoint-key registries that also rename the weight (``linear_proj``, 2-D) in
what the model saves. Remove this module when transformers' Qwen3-VL patch embedding
is a linear layer by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchProjection(nn.Module):
    """A non-overlapping ``Conv3d`` (kernel == stride, no padding) as one matrix product.

    Takes and returns what the convolution did, ``(N, C, T, P, P) -> (N, D, 1, 1, 1)``,
    so the patch embedding's own forward runs unchanged around it.
    """

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.weight = conv.weight  # (D, C, T, P, P), shared with the checkpoint's layout
        self.bias = conv.bias
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size

    def forward(self, patches_N_C_T_P_P: torch.Tensor) -> torch.Tensor:
        n = patches_N_C_T_P_P.shape[0]
        weight_D_K = self.weight.reshape(self.out_channels, -1)
        out_N_D = F.linear(patches_N_C_T_P_P.reshape(n, -1), weight_D_K, self.bias)
        return out_N_D.view(n, self.out_channels, 1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"


def is_patch_convolution(module: object) -> bool:
    """A Conv3d that only cuts non-overlapping patches and projects each one."""
    return (
        isinstance(module, nn.Conv3d)
        and module.stride == module.kernel_size
        and module.padding == (0, 0, 0)
        and module.dilation == (1, 1, 1)
        and module.groups == 1
    )


def linear_patch_projection(model: nn.Module) -> int:
    """Swap every patch convolution named ``*.patch_embed.proj`` for ``PatchProjection``;
    returns how many were swapped (0 for a model without one)."""
    swapped = 0
    for name, module in list(model.named_modules()):
        conv = getattr(module, "proj", None)
        if not name.endswith("patch_embed") or not is_patch_convolution(conv):
            continue
        assert isinstance(conv, nn.Conv3d)
        module.proj = PatchProjection(conv)
        swapped += 1
    return swapped
