"""The training forward pass: Qwen3-VL's backbone, then log-probs of chosen tokens.

The engine never calls the HF model's own forward (it would build (B, T, V) logits);
it runs the backbone for hidden states and a chunked LM head over only the positions
a loss needs (``selected_token_logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmtune.engine.batching import Batch, segment_bounds
from vlmtune.engine.distributed import blank_image_term
from vlmtune.engine.logprobs import selected_token_logprobs
from vlmtune.engine.step_profile import NO_PROFILE, StepProfile
from vlmtune.models.structure import VLBackbone


def packed_attention_kwargs(batch: Batch) -> dict[str, Any]:
    """What carries a packed batch's segments to every attention layer: transformers'
    flash-attention keyword names, read by ``models/packed_attention.py`` and by
    transformers' own flash path alike (int32 offsets into the flattened B * T tokens)."""
    B, T = batch.input_ids_B_T.shape
    bounds = segment_bounds(batch.segments, B, T)
    cu = torch.tensor(bounds, dtype=torch.int32, device=batch.input_ids_B_T.device)
    longest = max(e - s for s, e in zip(bounds[:-1], bounds[1:], strict=False))
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


@dataclass
class ForwardPass:
    backbone: VLBackbone
    lm_head: nn.Linear
    dtype: torch.dtype  # compute dtype of the pixel values
    spatial_merge: int
    vision_trainable: bool  # False: the tower runs without autograd
    sharded: bool  # under FSDP every rank must run the same modules each pass
    profile: StepProfile = NO_PROFILE

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Last hidden states of the language model, (B, T, H)."""
        kwargs: dict[str, Any] = {
            "input_ids": batch.input_ids_B_T,
            # Packed rows pass no mask but their segments (cu_seqlens): attention then
            # runs per example (models/packed_attention.py, or flash varlen), and no
            # T x T mask is built.
            "attention_mask": None if batch.packed else batch.attention_mask_B_T,
            "position_ids": batch.position_ids_4_B_T,
            # No KV cache (on by default): training needs none.
            "use_cache": False,
        }
        if batch.packed:
            kwargs |= packed_attention_kwargs(batch)
        if batch.pixel_values is not None:
            pixel_values = batch.pixel_values.to(self.dtype)
            # The tower runs here rather than inside the backbone call, so that the
            # packed rows' cu_seqlens never reach it (it has per-image ones of its own).
            # A frozen tower needs no activations kept for backward.
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trainable):
                encoded = self.backbone.get_image_features(
                    pixel_values, batch.image_grid_thw, return_dict=True
                )
            kwargs["mm_encoder_outputs"] = {"image": encoded}
        elif self.sharded:
            # Enter the (blank-image) vision output where real image features enter, in
            # the input embeddings: then every rank runs the vision blocks before the
            # language layers, and their backward after it, in the same order.
            input_ids = kwargs.pop("input_ids")
            embeds = self.backbone.get_input_embeddings()(input_ids)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trainable):
                blank = blank_image_term(self.backbone, self.spatial_merge, self.dtype)
            kwargs["inputs_embeds"] = embeds + blank.to(embeds.dtype)
        return self.backbone(**kwargs).last_hidden_state

    def token_logprobs(self, batch: Batch, needed_B_T: torch.Tensor) -> torch.Tensor:
        """``log p(target_t)`` at the ``needed`` positions, zeros elsewhere; (B, T) fp32."""
        with self.profile.phase("forward"):
            hidden_B_T_H = self.hidden_states(batch)
        needed_B_T = needed_B_T & batch.attention_mask_B_T.bool()
        anchor = None
        if self.sharded and torch.is_grad_enabled() and not bool(needed_B_T.any()):
            # A zero-weight micro-batch still has to reach the LM head in backward, or
            # this rank's reduce-scatter would cover fewer parameters than the others'.
            anchor = torch.zeros_like(needed_B_T)
            anchor[0, 0] = True
        selected = needed_B_T if anchor is None else anchor
        with self.profile.phase("lm_head"):
            lp_N = selected_token_logprobs(
                hidden_B_T_H[selected], self.lm_head, batch.targets_B_T[selected]
            )
        logprobs_B_T = torch.zeros(needed_B_T.shape, dtype=torch.float32, device=lp_N.device)
        if anchor is not None:
            return logprobs_B_T + lp_N.sum() * 0.0
        return logprobs_B_T.masked_scatter(needed_B_T, lp_N)
