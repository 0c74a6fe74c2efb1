"""What an engine is built from: ``EngineConfig``, and the one mapping from a job file.

Kept apart from the engine so that the job layer, the SDK and the server can name an
engine's settings without importing torch or the model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from vlmtune.config import JobFile


@dataclass
class EngineConfig:
    """What the engine is built from (one per training run)."""

    base_model: str
    revision: str | None = None  # branch, tag or commit of a hub id (None: the default branch)
    mode: Literal["full", "lora", "qlora"] = "lora"
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    freeze_vision_tower: bool = True
    freeze_projector: bool = True
    # The vocabulary matrix is most of a small model's weights (151,936 x hidden): its
    # dense gradient and Adam state dominate a CPU step, and a tied LM head shares it.
    freeze_embeddings: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    # None: the model family's cap (Qwen3-VL: 1); 0: no cap (``defaults.image_cap``).
    max_images_per_message: int | None = None
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: str = "auto"
    micro_batch_size: int = 1
    packing: bool = False  # several examples per row, positions restarting per example
    max_row_tokens: int = 4096  # a packed row's capacity
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "flash_attention_2"] = "sdpa"  # HF attn_implementation
    image_cache_dir: str | None = None  # on-disk cache of preprocessed pixels (content-keyed)
    seed: int = 0
    # Under torchrun: FSDP2 over all ranks. In one process only with ``fsdp`` (or CPU
    # offload, which needs it): fp32 master weights under bf16 compute on one GPU.
    fsdp: bool = False
    fsdp_reshard_after_forward: bool = True  # False keeps layers gathered until backward
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient reduce-scatter dtype
    fsdp_cpu_offload: bool = False  # sharded params, grads and Adam state in host memory
    # Under torchrun, instead of FSDP2: every rank holds the whole model and the trainable
    # gradients are all-reduced before each step (DDP). qlora always does this, since
    # 4-bit weights cannot be sharded; for LoRA it suits a model that fits one GPU.
    replicate: bool = False

    @classmethod
    def from_job(cls, job: JobFile) -> EngineConfig:
        """The engine a job file describes: the one job-to-engine mapping (every recipe
        builds its client from it, in this process or on a server).

        ``precision = "auto"`` (and ``"fp16"``, which overflows in the vision tower) stays
        ``"auto"``: the engine resolves it on the device it runs on (bf16 on a CUDA GPU
        that has it, else fp32), so a job run from Python trains as ``vlmtune train``
        would, and a remote run gets the server's device, not the client's.
        """
        hp, tr = job.hyperparameters, job.training
        model, compute, lora = job.model, job.compute, job.lora
        return cls(
            base_model=job.job.model,
            revision=job.job.revision,
            mode=job.finetune_mode,
            lora_rank=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            freeze_vision_tower=model.freeze_vision_tower,
            freeze_projector=model.freeze_projector,
            freeze_embeddings=model.freeze_embeddings,
            min_pixels=model.min_pixels,
            max_pixels=model.max_pixels,
            max_images_per_message=model.max_images_per_message,
            precision="auto" if tr.precision == "fp16" else tr.precision,
            device=tr.device,
            micro_batch_size=hp.per_device_batch,
            # Packing applies to every method: DPO pairs and RL completions are short, and
            # rows of sequence_length tokens make a CPU step 10-40x faster than one
            # example per micro-batch, with per-example outputs unchanged.
            packing=hp.packing,
            max_row_tokens=hp.sequence_length,
            gradient_checkpointing=tr.gradient_checkpointing,
            attention=tr.attention,
            seed=hp.seed,
            image_cache_dir=tr.image_cache_dir,
            # Under torchrun (`vlmtune train --nproc N` or [compute] gpu_count > 1), or in
            # one process with [compute] fsdp / cpu_offload.
            fsdp=compute.fsdp,
            fsdp_reshard_after_forward=compute.sharding == "full_shard",
            fsdp_reduce_dtype=compute.reduce_dtype,
            fsdp_cpu_offload=compute.cpu_offload,
            replicate=compute.sharding == "replicate",
        )


# The settings that describe a run rather than the machine it runs on: a client sends
# these to a server, and the server takes only these from a client (besides base_model,
# and mode, which follows lora_rank). Device, sharding and disk paths are the server's.
RUN_SETTINGS = (
    "revision", "lora_alpha", "lora_dropout", "target_modules", "freeze_vision_tower",
    "freeze_projector", "freeze_embeddings", "min_pixels", "max_pixels",
    "max_images_per_message", "precision", "micro_batch_size", "packing", "max_row_tokens",
    "gradient_checkpointing", "attention", "seed",
)  # fmt: skip
# What the host decides; over HTTP the server's own settings apply.
HOST_SETTINGS = (
    "device", "image_cache_dir", "fsdp", "fsdp_reshard_after_forward", "fsdp_reduce_dtype",
    "fsdp_cpu_offload", "replicate",
)  # fmt: skip
