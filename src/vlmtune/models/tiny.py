"""The built-in tiny Qwen3-VL: a real ``Qwen3VLForConditionalGeneration`` with random weights.

It is built on first use (no network) into an ordinary Hugging Face model directory
(config, safetensors, generation config, tokenizer, chat template, image and video
processor configs), so every test and the CPU demo go through the same loading path
as an 8B checkpoint. It keeps Qwen3-VL's real vocabulary size and special-token ids;
everything else is shrunk so it trains from scratch on two CPU cores in minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from vlmtune.models.constants import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IMAGE_PAD_ID,
    QWEN3_VL_VOCAB_SIZE,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
)

TINY_MODEL_NAME = "tiny-qwen3-vl"
# The same model with sparse MoE blocks (Qwen3VLMoeForConditionalGeneration): the fused
# 3-D expert weights, top-k router and per-layer sparse blocks of 30B-A3B / 235B-A22B.
TINY_MOE_MODEL_NAME = "tiny-qwen3-vl-moe"
# Bump when anything that goes into the directory changes, so old caches are not reused.
TINY_MODEL_VERSION = "v2"
TINY_SEED = 1234

# Gain of the final RMSNorm (standard init: 1). With the tied 0.02-std embedding as the
# output layer and a unit-RMS final hidden state, the largest logit any hidden state can
# reach is ~2.6, which floors the loss at ~9.3 nats over 151,936 tokens for anything that
# cannot retrain the norm or the embedding (LoRA). A gain of 8 puts confident predictions
# in reach: on a 10-class toy task LoRA goes 13.8 -> 3.5 nats in 20 steps (1: stuck at
# 10.6) and full fine-tuning converges ~5x faster.
TINY_FINAL_NORM_GAIN = 8.0

# Image pixel limits of the tiny processor. Qwen3-VL's own default minimum (65,536 px =
# 64 tokens) would blow an 8x8 digit up to 256x256; the tiny model instead allows
# images down to 64x64 px (2x2 merged patches = 4 tokens) and caps them at 256 tokens.
TINY_MIN_PIXELS = 4 * 32 * 32
TINY_MAX_PIXELS = 256 * 32 * 32

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": QWEN3_VL_VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    # Qwen3-VL's interleaved M-RoPE; the sections (t, h, w) sum to head_dim / 2.
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    },
    "attention_bias": False,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "tie_word_embeddings": True,
}

# Four experts of width 128, two per token: the MoE layers hold as many weights as
# the dense tiny's 512-wide MLPs and run half of them.
MOE_TEXT_CONFIG: dict[str, Any] = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "decoder_sparse_step": 1,
}

VISION_CONFIG: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_heads": 4,
    "hidden_act": "gelu_pytorch_tanh",
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 128,  # = text hidden_size
    "num_position_embeddings": 256,  # a 16x16 learned grid, interpolated to each image
    "deepstack_visual_indexes": [0],
}

GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": ENDOFTEXT_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "do_sample": True,
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.0,
    "temperature": 0.7,
}


def chat_template_text() -> str:
    """The Qwen3-VL-Instruct chat template shipped with the package (byte-identical copy)."""
    return resources.files("vlmtune.models").joinpath("assets/chat_template.jinja").read_text()


def default_cache_root() -> Path:
    env = os.environ.get("VLMTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlmtune"


def tiny_model_dir(cache_dir: Path | None = None, *, moe: bool = False) -> Path:
    """Return the tiny model's directory (``moe``: the MoE variant), building it on first use.

    ``cache_dir`` is the cache root (default ``$VLMTUNE_CACHE`` or ``~/.cache/vlmtune``);
    the model lives in ``<root>/tiny-qwen3-vl[-moe]-<version>``. The build happens in a temp dir next
    to it and is renamed into place, so a reader never sees a half-written model and
    concurrent builders (pytest-xdist, torchrun ranks) agree on one winner.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    name = TINY_MOE_MODEL_NAME if moe else TINY_MODEL_NAME
    target = root / f"{name}-{TINY_MODEL_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        build_tiny_model(tmp, moe=moe)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its build into place first: use that one.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def qwen3_vl_config(text: dict[str, Any], vision: dict[str, Any], *, tied: bool = True) -> Any:
    """A Qwen3-VL config (Qwen3-VL-MoE when ``text`` has experts) with the real
    special-token ids, for models built from dimensions rather than downloaded."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    return (Qwen3VLMoeConfig if text.get("num_experts") else Qwen3VLConfig)(
        text_config=dict(text),
        vision_config=dict(vision),
        image_token_id=IMAGE_PAD_ID,
        video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=tied,
    )


def tiny_config(moe: bool = False) -> Any:
    return qwen3_vl_config({**TEXT_CONFIG, **(MOE_TEXT_CONFIG if moe else {})}, VISION_CONFIG)


def build_tiny_processor(out_dir: Path) -> Any:
    """Write tokenizer + chat template + image/video processor configs; return the processor."""
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from vlmtune.models.tiny_tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    norm = [0.5, 0.5, 0.5]  # mean and std of each channel
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=norm,
        image_std=norm,
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": 16 * TINY_MAX_PIXELS},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=norm,
        image_std=norm,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template_text(),
    )
    processor.save_pretrained(str(out_dir))
    return processor


def build_tiny_model(out_dir: Path, *, moe: bool = False) -> None:
    """Build the whole model directory into ``out_dir`` (deterministic: fixed seed)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_processor(out_dir)
    # fork_rng: building the cache must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model_class = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
        # transformers wraps ``to`` in functools.wraps, which mypy takes for an unbound method
        model = model_class(tiny_config(moe)).to(torch.float32)  # type: ignore[arg-type]
    with torch.no_grad():
        model.model.language_model.norm.weight.fill_(TINY_FINAL_NORM_GAIN)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (out_dir / "vlmtune_tiny.json").write_text(
        json.dumps(
            {
                "name": TINY_MOE_MODEL_NAME if moe else TINY_MODEL_NAME,
                "version": TINY_MODEL_VERSION,
                "seed": TINY_SEED,
                "final_norm_gain": TINY_FINAL_NORM_GAIN,
            }
        )
        + "\n"
    )
