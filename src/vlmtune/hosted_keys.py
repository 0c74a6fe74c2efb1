"""The hosted Qwen3-VL trainer's keys, tabled: what each one becomes in vlmtune.

Read by ``job_dialect.translate`` (for TOML files and, through
``server/synth_config.py``, for the hosted CLI's job-create body). A key means what the
hosted CLI makes it mean (synth-ai's ``synth_ai/api/train/builders.py``
``build_sft_payload`` and ``synth_ai/api/train/configs/sft.py``).
"""

from __future__ import annotations

EVAL_EVERY = "hyperparameters.eval_every"
# The hosted files write evaluation keys in three places: [training.validation] (which
# the CLI copies into [hyperparameters]) and, in some examples, [hyperparameters.parallelism].
EVAL_SECTIONS = ("training.validation", "hyperparameters", "hyperparameters.parallelism")

# hosted key -> vlmtune key (the same setting).
MOVED_KEYS: dict[str, str] = {
    "job.data_path": "job.data",  # the CLI reads job.data, else job.data_path
    "data.validation_path": "job.validation_data",  # uploaded as the validation file
    "hyperparameters.batch_size": "hyperparameters.per_device_batch",
    "hyperparameters.total_steps": "hyperparameters.max_steps",
    "hyperparameters.train_steps": "hyperparameters.max_steps",
    "hyperparameters.steps": "hyperparameters.max_steps",
    "hyperparameters.lora_rank": "lora.r",
    "hyperparameters.lora_alpha": "lora.alpha",
    "hyperparameters.lora_dropout": "lora.dropout",
    "hyperparameters.lora_target_modules": "lora.target_modules",
    "training.lora.r": "lora.r",
    "training.lora.alpha": "lora.alpha",
    "training.lora.dropout": "lora.dropout",
    "training.lora.target_modules": "lora.target_modules",
    **{f"{section}.eval_steps": EVAL_EVERY for section in EVAL_SECTIONS},
    "hyperparameters.parallelism.activation_checkpointing": "training.gradient_checkpointing",
    "model_config.max_images_per_message": "model.max_images_per_message",
}

EVAL_REASON = "evaluation runs every hyperparameters.eval_every steps (0: at the end)"
BEST_MODEL_REASON = (
    "final/ holds the last step's weights; every checkpoint is kept under checkpoints/ "
    "and eval metrics are in metrics.jsonl"
)
# hosted key -> why vlmtune has nothing for it to steer.
IGNORED_KEYS: dict[str, str] = {
    "hyperparameters.parallelism.use_deepspeed": (
        "vlmtune shards with torch FSDP2 (compute.sharding), not DeepSpeed"
    ),
    "hyperparameters.parallelism.fsdp": (
        "several processes always shard with FSDP2 (compute.sharding); compute.fsdp "
        "does so in one process too"
    ),
    "hyperparameters.parallelism.tensor_parallel_size": (
        "no tensor parallelism: FSDP2 shards every layer over all processes instead"
    ),
    "hyperparameters.parallelism.pipeline_parallel_size": (
        "no pipeline parallelism: FSDP2 shards every layer over all processes instead"
    ),
    **{f"{section}.evaluation_strategy": EVAL_REASON for section in EVAL_SECTIONS},
    **{
        f"{section}.{key}": BEST_MODEL_REASON
        for section in EVAL_SECTIONS
        for key in (
            "save_best_model_at_end",
            "load_best_model_at_end",
            "metric_for_best_model",
            "greater_is_better",
        )
    },
    "job.poll_seconds": (
        "how long the hosted CLI polls; vlmtune train runs in the foreground "
        "(train --server URL --poll streams a served job)"
    ),
    "job.modalities": "Qwen3-VL reads text and images",
    "job.description": "a note for the hosted service's job list; name a run with job.name",
    "data.topology": "the hosted service's cluster layout; torchrun sets vlmtune's",
    "metadata": "hints for the hosted backend, which its CLI does not send; [compute] sets the GPUs",
    "model_config.supports_vision": "every Qwen3-VL model reads images",
    "model_config.max_model_len": (
        "a serving limit; training rows longer than hyperparameters.sequence_length are dropped"
    ),
    "tags": "labels for the hosted service's job list; name a run with job.name",
}

# Tables only the hosted files have: a key in one that no table above knows is refused
# by its full name (the schema would name only the table).
HOSTED_TABLES = (
    "data",
    "hyperparameters.parallelism",
    "training.validation",
    "training.lora",
    "model_config",
)

# hyperparameters.train_kind -> algorithm.variety
TRAIN_KINDS = {"peft": "lora", "lora": "lora", "qlora": "qlora", "fft": "fft", "full": "fft"}
# algorithm.method values -> vlmtune's (the hosted CLI accepts both spellings).
METHODS = {"supervised_finetune": "sft"}
# [training] mode values that name a method rather than a fine-tuning variety.
METHOD_MODES = {"sft_offline", "dpo_offline", "rl_online", "sft", "dpo", "rl", "grpo"}
# hosted training.mode -> vlmtune's
MODES = {"full_finetune": "full", "fft": "full"}
# training.mode -> the variety it means, where vlmtune's default (lora) would contradict it
VARIETY_OF_MODE = {"full": "fft", "qlora": "qlora"}
# DeepSpeed ZeRO stage -> the FSDP2 setting that shards the same state (0/1: none).
ZERO_STAGE_SHARDING = {0: None, 1: None, 2: "shard_grad_op", 3: "full_shard"}
# LoRA target names from other model families: no Qwen3-VL module has them.
FOREIGN_TARGETS = {"mm_projector": "LLaVA's projector"}

QLORA_REASON = "training.use_qlora = true: LoRA on a 4-bit base (QLoRA)"
REPLICATE_REASON = (
    "4-bit weights are not sharded: each GPU holds the whole 4-bit base and all-reduces "
    "only the LoRA gradients"
)
# What `vlmtune train` takes in place of the hosted CLI's --dataset (load.py appends it).
MISSING_KEY_HINTS = {
    "job.data": (
        "; name the training JSONL (the hosted CLI's --dataset) under [job], or with "
        "`vlmtune train --config FILE job.data=PATH`"
    ),
}
