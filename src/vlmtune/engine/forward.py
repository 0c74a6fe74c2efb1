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

from vlmtune.engine.batching import Batch
from vlmtune.engine.distributed import blank_image_term
from vlmtune.engine.logprobs import selected_token_logprobs
from vlmtune.models.structure import VLBackbone


@dataclass
class ForwardPass:
    backbone: VLBackbone
    lm_head: nn.Linear
    dtype: torch.dtype  # compute dtype of the pixel values
    spatial_merge: int
    vision_trainable: bool  # False: the tower runs without autograd
    sharded: bool  # under FSDP every rank must run the same modules each pass

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Last hidden states of the language model, (B, T, H)."""
        kwargs: dict[str, Any] = {
            "input_ids": batch.input_ids_B_T,
            # Packed rows pass no mask: transformers then builds a block-diagonal causal
            # mask (or varlen flash-attention) from the restarting text positions.
            "attention_mask": None if batch.packed else batch.attention_mask_B_T,
            "position_ids": batch.position_ids_4_B_T,
            # A KV cache (on by default) also switches off transformers' packed-row mask.
            "use_cache": False,
        }
        if batch.pixel_values is not None:
            pixel_values = batch.pixel_values.to(self.dtype)
            if self.vision_trainable:
                kwargs["pixel_values"] = pixel_values
                kwargs["image_grid_thw"] = batch.image_grid_thw
            else:
                # A frozen tower needs no activations kept for backward.
                with torch.no_grad():
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
        hidden_B_T_H = self.hidden_states(batch)
        needed_B_T = needed_B_T & batch.attention_mask_B_T.bool()
        anchor = None
        if self.sharded and torch.is_grad_enabled() and not bool(needed_B_T.any()):
            # A zero-weight micro-batch still has to reach the LM head in backward, or
            # this rank's reduce-scatter would cover fewer parameters than the others'.
            anchor = torch.zeros_like(needed_B_T)
            anchor[0, 0] = True
        selected = needed_B_T if anchor is None else anchor
        lp_N = selected_token_logprobs(
            hidden_B_T_H[selected], self.lm_head, batch.targets_B_T[selected]
        )
        logprobs_B_T = torch.zeros(needed_B_T.shape, dtype=torch.float32, device=lp_N.device)
        if anchor is not None:
            return logprobs_B_T + lp_N.sum() * 0.0
        return logprobs_B_T.masked_scatter(needed_B_T, lp_N)
