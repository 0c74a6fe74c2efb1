"""Batched sampling with ``generate`` and the same image preprocessing as training.

Log-probabilities are those of the model's own (temperature 1, unfiltered)
distribution at each sampled token: the quantity the training losses compare against.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmtune.engine.batching import Batch
from vlmtune.models.structure import VLModel
from vlmtune.types import (
    Datum,
    ModelInput,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    StopReason,
)


@dataclass(frozen=True)
class SamplingContext:
    """What generation needs from an engine, and nothing more (no engine import)."""

    hf_model: VLModel  # the HF model, whose ``generate`` runs
    mode_owner: nn.Module  # train/eval is switched here (a peft wrapper, or the HF model)
    collate: Callable[[list[Datum]], Batch]  # the training collation, on the device
    tokenizer: Any
    stop_token_ids: list[int]
    pad_token_id: int
    image_token_id: int
    dtype: torch.dtype  # pixels are cast to the compute dtype, as in training


def left_pad(
    input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move right padding to the left (decoder-only generation appends on the right)."""
    ids = torch.full_like(input_ids_B_T, pad_id)
    mask = torch.zeros_like(attention_mask_B_T)
    T = input_ids_B_T.shape[1]
    for b in range(input_ids_B_T.shape[0]):
        n = int(attention_mask_B_T[b].sum())
        ids[b, T - n :] = input_ids_B_T[b, :n]
        mask[b, T - n :] = 1
    return ids, mask


def _stop_ids(ctx: SamplingContext, params: SamplingParams) -> tuple[list[int], list[str]]:
    ids = list(ctx.stop_token_ids)
    strings: list[str] = []
    for s in params.stop or []:
        if isinstance(s, int):
            ids.append(s)
        else:
            strings.append(s)
    return ids, strings


def generate(
    ctx: SamplingContext,
    prompts: Sequence[ModelInput],
    num_samples: int,
    params: SamplingParams,
    max_batch: int = 64,
) -> list[SampleResponse]:
    expanded = [p for p in prompts for _ in range(num_samples)]
    sequences: list[SampledSequence] = []
    for start in range(0, len(expanded), max_batch):
        sequences.extend(_generate_batch(ctx, expanded[start : start + max_batch], params))
    return [
        SampleResponse(sequences=sequences[i * num_samples : (i + 1) * num_samples])
        for i in range(len(prompts))
    ]


@torch.no_grad()
def _generate_batch(
    ctx: SamplingContext, prompts: Sequence[ModelInput], params: SamplingParams
) -> list[SampledSequence]:
    batch = ctx.collate([Datum(model_input=p) for p in prompts])
    ids_B_T, mask_B_T = left_pad(batch.input_ids_B_T, batch.attention_mask_B_T, ctx.pad_token_id)
    stop_ids, stop_strings = _stop_ids(ctx, params)
    kwargs: dict = {
        "input_ids": ids_B_T,
        "attention_mask": mask_B_T,
        "mm_token_type_ids": (ids_B_T == ctx.image_token_id).int(),
        "max_new_tokens": params.max_tokens,
        "eos_token_id": stop_ids,
        "pad_token_id": ctx.pad_token_id,
        "output_logits": True,
        "return_dict_in_generate": True,
        "use_cache": True,
    }
    if batch.pixel_values is not None:
        kwargs["pixel_values"] = batch.pixel_values.to(ctx.dtype)
        kwargs["image_grid_thw"] = batch.image_grid_thw
    if params.temperature > 0:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        kwargs["top_k"] = params.top_k if params.top_k > 0 else None
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=ctx.tokenizer)

    was_training = ctx.mode_owner.training
    ctx.mode_owner.eval()
    try:
        # Sampling draws from a forked RNG so that it leaves training's random state as
        # it was; an unseeded call gets a fresh seed, or every call would start from the
        # same restored state and draw the same samples.
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = ctx.hf_model.generate(**kwargs)
    finally:
        ctx.mode_owner.train(was_training)

    new_B_N = out.sequences[:, ids_B_T.shape[1] :].cpu()
    logits = torch.stack(out.logits, dim=1).float()  # (B, N, V)
    logprobs_B_N = torch.log_softmax(logits, dim=-1).gather(
        -1, new_B_N.unsqueeze(-1).to(logits.device)
    )
    logprobs_B_N = logprobs_B_N.squeeze(-1).cpu()
    tokenizer = ctx.tokenizer
    results = []
    for b in range(new_B_N.shape[0]):
        tokens = new_B_N[b].tolist()
        n = len(tokens)
        reason: StopReason = "length"
        for i, t in enumerate(tokens):
            if t in stop_ids:
                n, reason = i + 1, "stop"
                break
        if stop_strings and reason == "length":
            text = tokenizer.decode(tokens[:n])
            if any(s in text for s in stop_strings):
                reason = "stop"
        results.append(
            SampledSequence(
                tokens=tokens[:n], logprobs=logprobs_B_N[b, :n].tolist(), stop_reason=reason
            )
        )
    return results
