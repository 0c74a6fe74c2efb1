"""The tiny model's TOML job, as the recipe, server and resume tests write it."""

from __future__ import annotations


def tiny_job(
    algorithm: str = 'variety = "lora"',
    job: str = "",
    hyperparameters: str = "",
    extra: str = "",
) -> str:
    """A job of ``tiny-qwen3-vl`` on ``train.jsonl``: LoRA rank 4, 64x64 images (4 image
    tokens each), sequences of 128 tokens. Each test adds its own lines to ``[algorithm]``
    (``algorithm``), ``[job]`` (``job``) and ``[hyperparameters]`` (``hyperparameters``),
    and whole sections after them (``extra``)."""
    return f"""
[algorithm]
{algorithm}
[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"
{job}
[hyperparameters]
sequence_length = 128
{hyperparameters}
[lora]
r = 4
[model]
min_pixels = 4096
max_pixels = 4096
{extra}
"""
