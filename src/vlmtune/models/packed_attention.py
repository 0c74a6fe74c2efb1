"""Attention over packed rows, one example (segment) at a time: no T x T mask.

A packed row holds several examples back to back. transformers' SDPA path keeps them
apart with a dense ``(B, 1, T, T)`` block-diagonal mask, built from the restarting
positions before every forward: the mask alone is 4 GiB at 65k tokens, and every
example then attends over the whole row, so packing costs more than the examples it
holds. This module registers ``PACKED_ATTENTION`` with transformers'
``AttentionInterface`` (and a mask function with ``AttentionMaskInterface``) that
instead runs attention per segment, from the row's ``cu_seqlens``:

* on CUDA with ``flash_attn`` importable and fp16/bf16 tensors: flash-attention's
  varlen kernel over the whole row, in one call;
* elsewhere: SDPA per segment, each causal on its own (SDPA's ``is_causal``, no mask).

Segment boundaries arrive as the keyword arguments transformers' flash path uses,
``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 offsets into the flattened ``B * T``
tokens, ``[0, ..., B * T]``) and ``max_length_q`` / ``max_length_k``; the language
model passes them through to every attention layer. Without them, segments are
derived from resets of the text ``position_ids`` (one host sync per layer), so a
caller that packs without ``cu_seqlens`` is still correct. Calls that are not packed
(padded batches, sampling with a KV cache) go to transformers' own SDPA function with
the mask transformers builds for them, as before.

``use_packed_attention(model)`` switches a Qwen3-VL model's language model to it; the
vision tower keeps its own implementation (it already attends per image).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_ATTENTION = "vlmtune_packed"

# The last cu_seqlens seen and its host copy: every layer of one forward gets the same
# tensor, so the device-to-host copy happens once per forward, not once per layer.
_last_bounds: tuple[torch.Tensor, list[int]] | None = None


@functools.cache
def _flash_varlen() -> Callable[..., torch.Tensor] | None:
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]  # optional, CUDA only
    except Exception:  # ImportError, or a CUDA/driver mismatch at import time
        return None
    return flash_attn_varlen_func


def flash_varlen_available(query: torch.Tensor) -> bool:
    """Whether ``query`` can take flash-attention's varlen kernel."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and _flash_varlen() is not None
    )


def cu_seqlens_from_positions(position_ids_B_T: torch.Tensor) -> torch.Tensor | None:
    """Segment offsets into the flattened ``B * T`` tokens where text positions restart
    (or a row begins), ``[0, ..., B * T]`` int32; None when no row holds two segments."""
    B, T = position_ids_B_T.shape
    starts_B_T = torch.ones_like(position_ids_B_T, dtype=torch.bool)
    starts_B_T[:, 1:] = position_ids_B_T[:, 1:] != position_ids_B_T[:, :-1] + 1
    if int(starts_B_T.sum()) == B:
        return None
    starts_N = starts_B_T.reshape(-1).nonzero().squeeze(-1)
    end = torch.tensor([B * T], device=starts_N.device, dtype=starts_N.dtype)
    return torch.cat([starts_N, end]).to(torch.int32)


def _bounds(cu_seqlens: torch.Tensor) -> list[int]:
    global _last_bounds
    last = _last_bounds
    if last is not None and last[0] is cu_seqlens:
        return last[1]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    _last_bounds = (cu_seqlens, bounds)
    return bounds


def _flat_heads(x_B_H_T_D: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (1, H, B*T, D); a view when B == 1."""
    B, H, T, D = x_B_H_T_D.shape
    if B == 1:
        return x_B_H_T_D
    return x_B_H_T_D.transpose(0, 1).reshape(1, H, B * T, D)


def per_segment_sdpa(
    query_B_H_T_D: torch.Tensor,
    key_B_K_T_D: torch.Tensor,
    value_B_K_T_D: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scaling: float | None,
    dropout: float,
    causal: bool,
) -> torch.Tensor:
    """SDPA on each segment alone; returns (B, T, H, D) like transformers' functions."""
    B, H, T, D = query_B_H_T_D.shape
    q = _flat_heads(query_B_H_T_D)
    k = _flat_heads(key_B_K_T_D)
    v = _flat_heads(value_B_K_T_D)
    gqa = k.shape[1] != H
    bounds = _bounds(cu_seqlens)
    outs = [
        F.scaled_dot_product_attention(
            q[:, :, s:e],
            k[:, :, s:e],
            v[:, :, s:e],
            dropout_p=dropout,
            scale=scaling,
            is_causal=causal and e - s > 1,
            enable_gqa=gqa,
        )
        for s, e in zip(bounds[:-1], bounds[1:], strict=False)
        if e > s
    ]
    out_1_H_N_D = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out_1_H_N_D.reshape(H, B, T, D).permute(1, 2, 0, 3).contiguous()


def flash_varlen_attention(
    query_B_H_T_D: torch.Tensor,
    key_B_K_T_D: torch.Tensor,
    value_B_K_T_D: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int | None,
    *,
    scaling: float | None,
    dropout: float,
    causal: bool,
) -> torch.Tensor:
    """flash-attention's varlen kernel over the flattened row; returns (B, T, H, D)."""
    varlen = _flash_varlen()
    assert varlen is not None
    B, H, T, D = query_B_H_T_D.shape
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (
        query_B_H_T_D, key_B_K_T_D, value_B_K_T_D
    ))  # fmt: skip
    cu = cu_seqlens.to(torch.int32)
    if max_length is None:
        max_length = int((cu[1:] - cu[:-1]).max())
    out_N_H_D = varlen(
        q,
        k,
        v,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=max_length,
        max_seqlen_k=max_length,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=causal,
    )
    return out_N_H_D.reshape(B, T, H, D)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, H, T, D) in, (B, T, H, D) out."""
    cu_seqlens = kwargs.pop("cu_seq_lens_q", None)
    max_length = kwargs.pop("max_length_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    kwargs.pop("max_length_k", None)
    square = query.shape[2] == key.shape[2] > 1
    positions = kwargs.get("position_ids")
    if (
        cu_seqlens is None
        and attention_mask is None
        and square
        and positions is not None
        and positions.shape == (query.shape[0], query.shape[2])
    ):
        cu_seqlens = cu_seqlens_from_positions(positions)
    if cu_seqlens is None or not square:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if flash_varlen_available(query):
        out = flash_varlen_attention(
            query,
            key,
            value,
            cu_seqlens,
            max_length,
            scaling=scaling,
            dropout=dropout,
            causal=causal,
        )
    else:
        out = per_segment_sdpa(
            query, key, value, cu_seqlens, scaling=scaling, dropout=dropout, causal=causal
        )
    return out, None


def packed_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """No mask without padding and without a cache offset: segments come from
    ``cu_seqlens`` (or the positions), causality from ``is_causal``. Anything else
    (a padded batch, decoding against a KV cache) gets SDPA's own mask."""
    no_offset = (
        isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    )
    if attention_mask is None and q_length == kv_length and no_offset:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
AttentionMaskInterface.register(PACKED_ATTENTION, packed_attention_mask)


def use_packed_attention(hf_model: Any) -> None:
    """Run the language model of a Qwen3-VL ``hf_model`` with ``PACKED_ATTENTION``."""
    hf_model.set_attn_implementation({"text_config": PACKED_ATTENTION})
