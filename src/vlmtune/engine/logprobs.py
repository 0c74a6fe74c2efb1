"""Token log-probabilities without full-vocabulary logits for the whole row.

Qwen3-VL's vocabulary is 151,936: fp32 logits for one 8,192-token row are 5 GB. The
training losses only need ``log p(target)`` at the positions they weight, so we gather
those hidden states first and run the LM head over them in chunks through one reused
``(chunk, V)`` block, in the forward and the backward pass alike: a frozen head
(``_FrozenHeadLogprobs``) makes the hidden states' gradient in forward, a trainable one
(``_TrainableHeadLogprobs``) recomputes each chunk in backward into a single weight
gradient. Without gradients (evaluation) and for FSDP's sharded weights, plain autograd
runs over chunks, large ones under activation checkpointing (``_chunked_logprobs``).

On CUDA a fused linear-cross-entropy kernel does the same without any Python-level
chunking, when one is installed (neither is a dependency): Liger Kernel's
``liger_fused_linear_cross_entropy(..., reduction="none")`` or Apple's Cut Cross-Entropy
``linear_cross_entropy(..., reduction="none", filter_eps=None)``. Both return the
per-token loss ``-log p(target)``, which is exactly what the engine needs (per-token
logprobs, not just a summed loss). ``VLMTUNE_FUSED_CE`` = ``auto`` (default) | ``liger``
| ``cce`` | ``off`` picks one; CPU tensors always take the chunked path below.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# The plain autograd path (no gradients, sharded weights): each chunk's logits stay
# under this many entries (128 MiB in fp32), ~220 positions of Qwen3-VL's vocabulary.
CHUNK_LOGITS_BUDGET = 32 * 2**20
# The frozen and trainable head paths hold one (chunk, V) fp32 block (32 MiB, ~55
# positions of Qwen3-VL's vocabulary) and keep none for backward: on the CPU, products
# of this size ran fastest per position (the logits block stays in cache).
HEAD_CHUNK_LOGITS_BUDGET = 8 * 2**20
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


class _FrozenHeadLogprobs(torch.autograd.Function):
    """``log p(target)`` through a frozen LM head, with its gradient made in forward.

    With the head's weight frozen, ``d lp_i / d h_i = (onehot(t_i) - p_i) @ W`` is one
    H-vector per position, whatever the loss: computed chunk by chunk here, while each
    chunk's softmax is at hand, it is all backward needs (N x H, the size of the hidden
    states). Against autograd through the chunk (or a checkpointed chunk) this keeps no
    (chunk, V) block for backward and recomputes nothing; backward is a scaling.

    Every chunk goes through one reused fp32 (chunk, V) buffer (``_softmax_chunks``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden_N_H: torch.Tensor,
        weight_V_H: torch.Tensor,
        bias_V: torch.Tensor | None,
        targets_N: torch.Tensor,
        chunk_tokens: int,
    ) -> torch.Tensor:
        lp_N = torch.empty(hidden_N_H.shape[0], dtype=torch.float32, device=hidden_N_H.device)
        dlp_N_H = torch.empty_like(hidden_N_H)
        for rows, p, sum_n1, z_t, t_n1 in _softmax_chunks(
            hidden_N_H, weight_V_H, bias_V, targets_N, chunk_tokens
        ):
            lp_N[rows] = z_t - sum_n1.squeeze(-1).log()
            dlp_N_H[rows] = (
                _onehot_minus_softmax_(p, sum_n1, t_n1).to(weight_V_H.dtype) @ weight_V_H
            )
        ctx.save_for_backward(dlp_N_H)
        return lp_N

    @staticmethod
    def backward(ctx: Any, grad_N: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (dlp_N_H,) = ctx.saved_tensors
        return (grad_N.unsqueeze(-1).to(dlp_N_H.dtype) * dlp_N_H, None, None, None, None)


class _TrainableHeadLogprobs(torch.autograd.Function):
    """``log p(target)`` through a trainable LM head, with one ``(V, H)`` weight gradient.

    Autograd through the chunks keeps each chunk's logits and softmax for backward and
    makes a ``(V, H)`` weight gradient per chunk before summing them: with a tied
    151,936-entry embedding that is several vocabulary-sized blocks alive at once.
    Here forward keeps only ``h`` (the saved hidden states) and backward recomputes each
    chunk's softmax in one reused ``(chunk, V)`` buffer, then adds ``G^T h`` into a single
    weight gradient in place, where ``G = grad * (onehot(t) - p)`` per position:

        d lp_i / d h_i = (onehot(t_i) - p_i) @ W,    d lp_i / d W = (onehot(t_i) - p_i)^T h_i

    The price is one more (chunk, H) x (H, V) product per chunk (the recomputed logits).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden_N_H: torch.Tensor,
        weight_V_H: torch.Tensor,
        bias_V: torch.Tensor | None,
        targets_N: torch.Tensor,
        chunk_tokens: int,
    ) -> torch.Tensor:
        lp_N = torch.empty(hidden_N_H.shape[0], dtype=torch.float32, device=hidden_N_H.device)
        for rows, _, sum_n1, z_t, _ in _softmax_chunks(
            hidden_N_H, weight_V_H, bias_V, targets_N, chunk_tokens
        ):
            lp_N[rows] = z_t - sum_n1.squeeze(-1).log()
        ctx.save_for_backward(hidden_N_H, weight_V_H, bias_V, targets_N)
        ctx.chunk_tokens = chunk_tokens
        return lp_N

    @staticmethod
    def backward(ctx: Any, grad_N: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_N_H, weight_V_H, bias_V, targets_N = ctx.saved_tensors
        grad_h_N_H = torch.empty_like(hidden_N_H) if ctx.needs_input_grad[0] else None
        grad_w_V_H: torch.Tensor | None = None  # the first chunk's product starts the sum
        grad_b_V = (
            torch.zeros_like(bias_V) if bias_V is not None and ctx.needs_input_grad[2] else None
        )
        for rows, p, sum_n1, _, t_n1 in _softmax_chunks(
            hidden_N_H, weight_V_H, bias_V, targets_N, ctx.chunk_tokens
        ):
            # G = grad * (onehot - softmax), in place in the logits buffer
            G = _onehot_minus_softmax_(p, sum_n1, t_n1).mul_(grad_N[rows].unsqueeze(-1))
            g = G.to(weight_V_H.dtype)
            if grad_h_N_H is not None:
                grad_h_N_H[rows] = g @ weight_V_H
            if ctx.needs_input_grad[1]:
                if grad_w_V_H is None:
                    grad_w_V_H = g.t() @ hidden_N_H[rows]
                else:
                    grad_w_V_H.addmm_(g.t(), hidden_N_H[rows])
            if grad_b_V is not None:
                grad_b_V.add_(G.sum(dim=0).to(grad_b_V.dtype))
        return grad_h_N_H, grad_w_V_H, grad_b_V, None, None


def _softmax_chunks(
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    bias_V: torch.Tensor | None,
    targets_N: torch.Tensor,
    chunk_tokens: int,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each chunk's ``(rows, exp_z, sum_n1, z_target, targets_n1)``: ``exp_z`` is
    ``exp(logits - row max)`` in fp32, written into one buffer that every chunk reuses
    (freeing and reallocating ~32 MiB blocks per chunk fragments glibc's heap: small
    tensors land in the freed blocks until RSS holds GiBs of them), so it is
    valid until the next chunk; ``z_target - log(sum_n1)`` is ``log p(target)``."""
    N, V = hidden_N_H.shape[0], weight_V_H.shape[0]
    buf = torch.empty(min(N, chunk_tokens), V, dtype=torch.float32, device=hidden_N_H.device)
    fp32 = weight_V_H.dtype == torch.float32 and hidden_N_H.dtype == torch.float32
    for start in range(0, N, chunk_tokens):
        h = hidden_N_H[start : start + chunk_tokens]
        rows = slice(start, start + h.shape[0])
        z = buf[: h.shape[0]]
        if fp32:
            torch.mm(h, weight_V_H.t(), out=z)
            if bias_V is not None:
                z.add_(bias_V)
        else:  # fp32 for the softmax, as in _chunk_logprobs
            z.copy_(F.linear(h, weight_V_H, bias_V))
        z.sub_(z.amax(dim=-1, keepdim=True))
        t_n1 = targets_N[rows].unsqueeze(-1)
        z_t = z.gather(-1, t_n1).squeeze(-1)
        yield rows, z, z.exp_().sum(dim=-1, keepdim=True), z_t, t_n1


def _onehot_minus_softmax_(
    exp_z: torch.Tensor, sum_n1: torch.Tensor, t_n1: torch.Tensor
) -> torch.Tensor:
    """``onehot(t) - softmax`` in place in ``exp_z`` (``d log p(t) / d logits``)."""
    exp_z.div_(-sum_n1).scatter_add_(-1, t_n1, torch.ones_like(t_n1, dtype=exp_z.dtype))
    return exp_z


FusedBackend = Literal["liger", "cce"]
FUSED_CE_ENV = "VLMTUNE_FUSED_CE"
# Liger computes per-token gradients correctly for reduction="none" only from 0.8.2 on
# (earlier versions scale grad_weight by one scalar after summing over tokens).
LIGER_MIN_VERSION_FOR_GRAD = (0, 8, 2)


@functools.cache
def _load_liger() -> tuple[Callable[..., torch.Tensor], bool] | None:
    """(per-token loss function, gradients correct) or None when Liger is absent."""
    try:
        from importlib.metadata import version

        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # ImportError, or a Triton/driver problem at import time
        return None
    try:
        parts = tuple(int(p) for p in version("liger-kernel").split(".")[:3])
    except ValueError:  # a dev/local version string: trust the installed API
        parts = LIGER_MIN_VERSION_FOR_GRAD

    def per_token_loss(h, w, b, t):
        return liger_fused_linear_cross_entropy(h, w, t, bias=b, reduction="none")

    return per_token_loss, parts >= LIGER_MIN_VERSION_FOR_GRAD


@functools.cache
def _load_cce() -> Callable[..., torch.Tensor] | None:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        return None

    def per_token_loss(h, w, b, t):
        # filter_eps=None: exact gradients (its default skips small softmax entries).
        return linear_cross_entropy(h, w, t, reduction="none", filter_eps=None)

    return per_token_loss


def _is_plain_tensor(t: torch.Tensor) -> bool:
    # FSDP2 shards parameters as DTensors, which the Triton kernels cannot take.
    return type(t).__name__ not in ("DTensor",)


def fused_backend(
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    bias_V: torch.Tensor | None,
    needs_grad: bool,
    preference: str | None = None,
) -> FusedBackend | None:
    """The fused kernel to use for these tensors, or None for the chunked torch path."""
    preference = (preference or os.environ.get(FUSED_CE_ENV, "auto")).lower()
    if preference not in ("auto", "liger", "cce", "off"):
        raise ValueError(f"{FUSED_CE_ENV}={preference!r}: expected auto, liger, cce or off")
    if (
        preference == "off"
        or hidden_N_H.device.type != "cuda"
        or hidden_N_H.dtype != weight_V_H.dtype
        or not (_is_plain_tensor(weight_V_H) and _is_plain_tensor(hidden_N_H))
    ):
        return None
    if preference in ("auto", "liger"):
        liger = _load_liger()
        if liger is not None and (liger[1] or not needs_grad):
            return "liger"
        if preference == "liger":
            raise RuntimeError(
                f"{FUSED_CE_ENV}=liger but liger-kernel is "
                + (
                    "not importable"
                    if liger is None
                    else "older than 0.8.2 (wrong per-token grads)"
                )
            )
    if preference in ("auto", "cce"):
        if bias_V is None and _load_cce() is not None:
            return "cce"
        if preference == "cce":
            raise RuntimeError(
                f"{FUSED_CE_ENV}=cce but cut-cross-entropy is not importable (or the LM head has a bias)"
            )
    return None


def fused_token_logprobs(
    backend: FusedBackend,
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    bias_V: torch.Tensor | None,
    targets_N: torch.Tensor,
) -> torch.Tensor:
    """``log p(target)`` per position from a fused kernel's per-token loss, fp32."""
    if backend == "liger":
        loaded = _load_liger()
        assert loaded is not None
        per_token_loss = loaded[0]
    else:
        cce = _load_cce()
        assert cce is not None
        per_token_loss = cce
    loss_N = per_token_loss(hidden_N_H.contiguous(), weight_V_H, bias_V, targets_N.contiguous())
    return -loss_N.float()


def selected_token_logprobs(
    hidden_N_H: torch.Tensor,
    lm_head: torch.nn.Linear,
    targets_N: torch.Tensor,
    chunk_tokens: int | None = None,
    fused: str | None = None,
) -> torch.Tensor:
    """``log softmax(lm_head(h))[target]`` for N selected positions, chunk by chunk.

    ``lm_head`` must be a plain ``nn.Linear`` (its weight may be tied to the
    embeddings); adapters on the LM head are not supported here. ``fused`` overrides
    ``$VLMTUNE_FUSED_CE`` (``auto``/``liger``/``cce``/``off``); CUDA only.
    """
    weight_V_H = lm_head.weight
    bias_V = getattr(lm_head, "bias", None)
    needs_grad = torch.is_grad_enabled() and (hidden_N_H.requires_grad or weight_V_H.requires_grad)
    if hidden_N_H.shape[0] > 0:
        backend = fused_backend(hidden_N_H, weight_V_H, bias_V, needs_grad, fused)
        if backend is not None:
            return fused_token_logprobs(backend, hidden_N_H, weight_V_H, bias_V, targets_N)
    if needs_grad and _is_plain_tensor(weight_V_H) and hidden_N_H.shape[0] > 0:
        chunk = chunk_tokens or max(1, HEAD_CHUNK_LOGITS_BUDGET // weight_V_H.shape[0])
        head_frozen = not weight_V_H.requires_grad and (bias_V is None or not bias_V.requires_grad)
        head_fn = _FrozenHeadLogprobs if head_frozen else _TrainableHeadLogprobs
        return head_fn.apply(hidden_N_H, weight_V_H, bias_V, targets_N, chunk)
    return _chunked_logprobs(hidden_N_H, weight_V_H, bias_V, targets_N, chunk_tokens, needs_grad)


def _chunked_logprobs(
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    bias_V: torch.Tensor | None,
    targets_N: torch.Tensor,
    chunk_tokens: int | None,
    needs_grad: bool,
) -> torch.Tensor:
    """Plain autograd over chunks: without gradients (evaluation, sampling) and for
    FSDP's sharded (DTensor) weights, which the in-place paths above cannot take."""
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGITS_BUDGET // weight_V_H.shape[0])
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
