"""Token log-probabilities without full-vocabulary logits for the whole row.

Qwen3-VL's vocabulary is 151,936: fp32 logits for one 8,192-token row are 5 GB. The
training losses only need ``log p(target)`` at the positions they weight, so we gather
those hidden states first and run the LM head over them in chunks, each chunk under
activation checkpointing: the peak extra memory is one ``(chunk, V)`` block, in the
forward and the backward pass alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Each chunk's logits stay under this many entries (128 MiB in fp32): with Qwen3-VL's
# 151,936-entry vocabulary that is ~220 positions per chunk.
CHUNK_LOGITS_BUDGET = 32 * 2**20
# Below this many logits (64 MiB in fp32) a chunk is kept rather than recomputed in
# backward: recomputation costs a third more LM-head work for no real memory saving.
CHECKPOINT_MIN_LOGITS = 16 * 2**20


def _chunk_logprobs(
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    bias_V: torch.Tensor | None,
    targets_N: torch.Tensor,
) -> torch.Tensor:
    # fp32 for the softmax: bf16 logsumexp over 150k entries loses ~2 digits.
    logits_N_V = F.linear(hidden_N_H, weight_V_H, bias_V).float()
    target_logits_N = logits_N_V.gather(-1, targets_N.unsqueeze(-1)).squeeze(-1)
    return target_logits_N - torch.logsumexp(logits_N_V, dim=-1)


def selected_token_logprobs(
    hidden_N_H: torch.Tensor,
    lm_head: torch.nn.Module,
    targets_N: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """``log softmax(lm_head(h))[target]`` for N selected positions, chunk by chunk.

    ``lm_head`` must be a plain ``nn.Linear`` (its weight may be tied to the
    embeddings); adapters on the LM head are not supported here.
    """
    weight_V_H = lm_head.weight
    bias_V = getattr(lm_head, "bias", None)
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGITS_BUDGET // weight_V_H.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden_N_H.requires_grad or weight_V_H.requires_grad)
    pieces = []
    for start in range(0, hidden_N_H.shape[0], chunk_tokens):
        h = hidden_N_H[start : start + chunk_tokens]
        t = targets_N[start : start + chunk_tokens]
        if needs_grad and h.shape[0] * weight_V_H.shape[0] >= CHECKPOINT_MIN_LOGITS:
            pieces.append(
                checkpoint(_chunk_logprobs, h, weight_V_H, bias_V, t, use_reentrant=False)
            )
        else:
            pieces.append(_chunk_logprobs(h, weight_V_H, bias_V, t))
    if not pieces:
        return hidden_N_H.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def full_logits_token_logprobs(
    logits_B_T_V: torch.Tensor, targets_B_T: torch.Tensor
) -> torch.Tensor:
    """Reference implementation on materialised logits (tests compare against it)."""
    logp_B_T_V = torch.log_softmax(logits_B_T_V.float(), dim=-1)
    return logp_B_T_V.gather(-1, targets_B_T.unsqueeze(-1)).squeeze(-1)
