"""Activation memory of one training step, moment by moment, as this engine runs it.

A step has up to four moments that can hold the peak; the estimate is the largest:

- the vision tower's forward (a frozen tower runs without autograd: one block's working
  set over every patch of the row, the pixels, and the merged features made so far);
- the language model's forward: what it keeps for backward (every tensor a decoder
  layer saves, or with activation checkpointing only each layer's input), plus one
  layer's forward working set under checkpointing, plus the vision features it reads;
- the language model's backward: what forward kept, plus the larger of the LM head's
  chunk at its peak and (checkpointing) one layer recomputed;
- a trainable vision tower's own backward, after the language model's is done.

Packed rows attend per example (flash-attention varlen, or SDPA per segment:
``models/packed_attention.py``), so no T x T mask is counted; flash and SDPA's flash
kernel keep only a per-head logsumexp besides q, k, v and the output.

The LM head never makes (T, V) logits (``engine/logprobs.py``): frozen (LoRA, frozen
embeddings) or trainable, it runs one fp32 block of ``HEAD_CHUNK_LOGITS_BUDGET`` logits
at a time (plus the compute-dtype logits it is cast from) and holds an (N, H) gradient:
a frozen head makes it in forward, a trainable one in backward, where it recomputes each
chunk (its (V, H) weight gradient is the parameter's, counted with the gradients). The fused kernels (Liger, Cut
Cross-Entropy) are optional extras, not counted: with one installed the head needs less.

Pure arithmetic on ``ModelDims``: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmtune.planning.memory import ModelDims

# = vlmtune.engine.logprobs.HEAD_CHUNK_LOGITS_BUDGET (a test keeps them equal); not
# imported so that planning stays free of torch.
HEAD_CHUNK_LOGITS_BUDGET = 8 * 2**20
# Qwen3-VL merges 2 x 2 vision patches into one language-model image token.
PATCHES_PER_IMAGE_TOKEN = 4
# Values per patch of pixel_values: 3 channels x 2 frames x 16 x 16 pixels.
PATCH_INPUT = 1536
FP32 = 4


@dataclass(frozen=True)
class Activations:
    """The peak, the moment that holds it, and what it holds there (bytes)."""

    peak: int
    phase: str
    parts: tuple[tuple[str, int], ...]


def activation_bytes_per_token_layer(dims: ModelDims, cb: int) -> int:
    """Bytes one decoder layer saves for backward, per token (compute dtype ``cb`` bytes).

    RMSNorms save an fp32 copy and the normalised output (x2 norms, plus the q/k norms);
    attention saves q, k, v after RoPE, the key/value heads repeated for GQA, and the
    output; the SwiGLU MLP saves gate, up, act(gate) and their product.
    """
    h, q, kv = dims.hidden, dims.q_dim, dims.kv_dim
    inter = dims.intermediate * (dims.experts_active or 1)
    norms = 2 * (2 * FP32 + cb) * h + (2 * FP32 + cb) * (q + kv)
    attention = cb * (2 * q + 2 * kv) + cb * 2 * (q - kv) + cb * q
    mlp = 4 * cb * inter
    return norms + attention + mlp


def layer_forward_bytes_per_token(dims: ModelDims, cb: int) -> int:
    """A checkpointed layer's forward keeps nothing, but holds at once its input, the
    residual, and the MLP's up, act(gate) and product: the largest moment inside it."""
    inter = dims.intermediate * (dims.experts_active or 1)
    return 2 * cb * dims.hidden + 3 * cb * inter


def lm_head_bytes(dims: ModelDims, cb: int, weighted: int) -> int:
    """The LM head's loss at its peak, beyond the (N, H) hidden states it reads."""
    chunk = min(weighted, max(1, HEAD_CHUNK_LOGITS_BUDGET // dims.vocab))
    cast = 0 if cb == FP32 else cb * chunk * dims.vocab  # F.linear's output, then fp32
    return FP32 * chunk * dims.vocab + cast + cb * dims.hidden * weighted


def vision_block_bytes_per_patch(dims: ModelDims, cb: int) -> tuple[int, int]:
    """(working set of one block run without autograd, what one block saves for
    backward), per patch. Both count RoPE's fp32 copies of q and k (and rotate_half's)."""
    vh, vi = dims.vision_hidden, dims.vision_intermediate
    rope = 4 * FP32 * vh
    attention_moment = cb * 6 * vh + rope  # input, norm, q/k/v, output
    mlp_moment = cb * (3 * vh + 2 * vi)  # input, residual, norm, fc1, act
    saved = cb * (9 * vh + 2 * vi) + rope
    return max(attention_moment, mlp_moment), saved


def step_activations(
    dims: ModelDims,
    *,
    cb: int,
    context: int,
    weighted: int,
    image_tokens: int,
    checkpointing: bool,
    vision_trainable: bool,
) -> Activations:
    """Peak activation bytes of one step on a packed row of ``context`` tokens, of which
    ``weighted`` carry a loss and ``image_tokens`` are image positions."""
    T, h = context, dims.hidden
    per_layer = activation_bytes_per_token_layer(dims, cb)
    # Input embeddings, the final norm's fp32 copies, the weighted positions' states.
    outside = cb * h * T + (2 * FP32 + cb) * h * T + cb * h * weighted
    head = lm_head_bytes(dims, cb, weighted)
    layers = f"{dims.layers} x {T:,} tokens"
    if checkpointing:
        kept = ("decoder layer inputs kept (" + layers + ")", dims.layers * cb * h * T)
        fwd_moment = (
            "one layer's forward working set",
            layer_forward_bytes_per_token(dims, cb) * T,
        )
        recompute = ("one decoder layer recomputed in backward", per_layer * T)
    else:
        kept = ("decoder layer activations kept (" + layers + ")", dims.layers * per_layer * T)
        fwd_moment = ("", 0)
        recompute = ("", 0)
    base = [kept, ("embeddings, final norm, weighted hidden states", outside)]

    images = min(image_tokens, T)
    patches = PATCHES_PER_IMAGE_TOKEN * images
    features = dims.vision_mergers * cb * h * images  # merged tower outputs the LM reads
    block_now, block_saved = vision_block_bytes_per_patch(dims, cb)
    merger_saved = dims.vision_mergers * 4 * cb * 4 * dims.vision_hidden * images
    tower_kept = 0
    if vision_trainable and images:
        per_patch = cb * dims.vision_hidden if checkpointing else block_saved
        tower_kept = dims.vision_layers * per_patch * patches + merger_saved
    moments: list[tuple[str, list[tuple[str, int]]]] = []
    if images and not vision_trainable:
        pixels = (FP32 + cb) * PATCH_INPUT * patches
        moments.append(
            (
                "vision tower forward (frozen: no autograd)",
                [
                    (f"pixels of {patches:,} patches (fp32 and compute dtype)", pixels),
                    ("one vision block's working set", block_now * patches),
                    (f"merged features ({dims.vision_mergers} mergers)", features),
                ],
            )
        )
    held = (
        ("vision tower activations kept for its backward", tower_kept)
        if vision_trainable
        else (f"vision features read by the language model ({images:,} image tokens)", features)
    )
    moments.append(("language model forward", [*base, held, fwd_moment]))
    head_part = ("LM head loss chunk at its peak", head)
    moments.append(
        (
            "language model backward",
            [
                *base,
                ("vision tower activations kept for its backward", tower_kept),
                max(head_part, recompute, key=lambda p: p[1]),
            ],
        )
    )
    if tower_kept:
        recompute_block = block_saved * patches if checkpointing else 0
        moments.append(
            (
                "vision tower backward",
                [
                    ("vision tower activations kept", tower_kept),
                    ("one vision block recomputed", recompute_block),
                ],
            )
        )
    phase, parts = max(moments, key=lambda m: sum(b for _, b in m[1]))
    shown = tuple((what, b) for what, b in parts if b)
    return Activations(peak=sum(b for _, b in shown), phase=phase, parts=shown)
