"""The TOML job file's schema: typed sections, every field documented.

The schema is the one users already write for hosted Qwen3-VL fine-tuning
(``[algorithm]``, ``[job]``, ``[compute]``, ``[training]``, ``[hyperparameters]``,
``[lora]``, ``[model]``). Unknown keys, wrong types and contradictions all end up in
one ``ConfigError`` whose lines name the TOML key.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
)

from vlmtune.settings import SettingChange


def _not_blank(value: str) -> str:
    # A name or path of only spaces is as empty as "": it would resolve to the TOML's folder.
    if not value.strip():
        raise ValueError("must not be empty")
    return value


# Names, paths and ids: "" would silently mean "the current folder" or "no model".
Name = Annotated[str, AfterValidator(_not_blank)]

# cuda:N as torch spells it; "mps" only where this torch has the backend (checked below).
_DEVICE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")


def _known_device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")
    if value == "mps":
        import torch

        if not torch.backends.mps.is_built():
            raise ValueError("mps: this torch was built without the Apple MPS backend")
    return value


class _Section(BaseModel):
    # allow_inf_nan=False: an inf learning rate trains NaN weights, so every float
    # field refuses inf and nan (TOML's inf/nan and overrides alike).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AlgorithmConfig(_Section):
    type: Literal["offline", "online"] = Field(
        "offline", description="offline (SFT, DPO) or online (RL)"
    )
    method: Literal["sft", "dpo", "rl"] = Field("sft", description="training method")
    variety: Literal["lora", "qlora", "fft"] = Field(
        "lora", description="lora, qlora or fft (full fine-tune)"
    )


class JobConfig(_Section):
    model: Name = Field(
        description="base model: a Hugging Face id (downloaded into the HF cache on first use), "
        "a registry alias such as 'qwen3-vl-8b', a hosted name such as "
        "'accounts/fireworks/models/qwen3-vl-8b-instruct', 'tiny-qwen3-vl', or a model "
        "directory (a relative one resolves from the TOML's folder)"
    )
    revision: Name | None = Field(
        None,
        description="branch, tag or commit of the Hugging Face model to use (None: its default "
        "branch); pin a commit to make the run reproducible",
    )
    data: Name = Field(description="training JSONL (relative paths resolve from the TOML's folder)")
    validation_data: Name | None = Field(None, description="held-out JSONL for in-training eval")
    name: Name | None = Field(
        None, description="run name: the run directory is <output_dir>/<name>"
    )
    output_dir: Name = Field("runs", description="parent of run directories")
    image_root: Name | None = Field(None, description="allow local image paths under this folder")


class ComputeConfig(_Section):
    gpu_type: Name = Field("auto", description="GPU model, e.g. H100; 'auto' detects")
    gpu_count: int = Field(1, ge=1, description="GPUs per node")
    nodes: int = Field(1, ge=1, description="number of nodes")
    shape: Name | None = Field(
        None, description="training shape (see `vlmtune shapes`); sets the keys it owns"
    )
    training_shape_ref: Name | None = Field(None, description="the SDK's name for compute.shape")
    sharding: Literal["full_shard", "shard_grad_op", "replicate"] = Field(
        "full_shard",
        description="several processes: full_shard (FSDP2, frees layers after forward), "
        "shard_grad_op (FSDP2, keeps them), or replicate (each GPU holds the whole model "
        "and all-reduces only the trainable gradients; what qlora always does)",
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="FSDP gradient reduce-scatter dtype (GPU)"
    )
    cpu_offload: bool = Field(
        False, description="FSDP: shards and optimizer state in host memory (implies fsdp)"
    )
    fsdp: bool = Field(
        False,
        description="FSDP2 in one process too: fp32 master weights under bf16 compute "
        "(several processes always use it)",
    )

    @property
    def shape_name(self) -> str | None:
        return self.shape or self.training_shape_ref


class TrainingConfig(_Section):
    mode: Literal["lora", "qlora", "full"] | None = Field(
        None, description="must agree with algorithm.variety"
    )
    use_qlora: bool = Field(False, description="4-bit base weights (CUDA only)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="compute dtype")
    device: Annotated[str, AfterValidator(_known_device)] = Field(
        "auto", description="auto, cpu, cuda, cuda:N (or mps where torch has it)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    attention: Literal["sdpa", "flash_attention_2"] = Field(
        "sdpa",
        description="attention kernel: sdpa (any device; packed rows attend per example, "
        "with flash-attn varlen on CUDA when installed), or flash_attention_2 (CUDA and "
        "the flash-attn package everywhere); neither builds a T x T mask for packed rows",
    )
    image_workers: int | None = Field(
        None, ge=0, description="image preprocessing processes (unset: auto, 0: in-process)"
    )
    image_cache_dir: Name | None = Field(
        None, description="reuse preprocessed images across epochs and runs"
    )


class HyperparametersConfig(_Section):
    n_epochs: int = Field(1, ge=1, description="passes over the training data")
    per_device_batch: int = Field(1, ge=1, description="examples per micro-batch")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="micro-batches per optimizer step"
    )
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    sequence_length: int = Field(4096, ge=16, description="longer examples are dropped, never cut")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps with linear warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="decay after warmup"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    # Bounded: RL derives per-step sampling seeds from it, which torch takes as 64-bit.
    seed: int = Field(42, ge=0, lt=2**32, description="data order and initialisation seed")
    eval_every: int = Field(
        0, ge=0, description="eval on validation_data every N steps (0: end only)"
    )
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: none but final)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 disables)")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    packing: bool = Field(True, description="pack examples into rows of sequence_length (SFT)")
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="which turns carry loss"
    )
    group_by_length: bool = Field(False, description="sort batches by length (off for vision)")
    pin_memory: bool = Field(False, description="pinned host memory for loading (off for vision)")
    eval_max_examples: int = Field(
        500, ge=1, description="validation rows used for generation accuracy"
    )
    eval_max_new_tokens: int = Field(32, ge=1, description="tokens generated per eval prompt")


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA path")
    target_modules: Annotated[list[Name], Field(min_length=1)] | Literal["all-linear"] = Field(
        "all-linear", description='module names, or "all-linear" (also as ["all-linear"])'
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _module_names(cls, value: object) -> object:
        # Checked here, not by the union, so a mistake is one message rather than one
        # per union branch. The hosted trainer's files (and peft users) write ["all-linear"].
        if value in ("all-linear", ["all-linear"]):
            return "all-linear"
        if not isinstance(value, list):
            raise ValueError('must be a list of module names, or "all-linear"')
        if not value:
            raise ValueError('an empty list adapts nothing; name modules or use "all-linear"')
        if not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError("module names must be non-empty strings")
        return value


class ModelConfig(_Section):
    # 0 for "no cap": TOML has no null, and a vision trainer has no use for a cap of
    # zero images (as max_grad_norm = 0 disables clipping).
    max_images_per_message: int | None = Field(
        None,
        ge=0,
        description="images kept per message, the rest dropped and counted (never the row); "
        "unset: the model family's cap (Qwen3-VL: 1); 0: no cap",
    )
    min_pixels: int | None = Field(None, ge=1, description="images are upscaled to at least this")
    max_pixels: int | None = Field(None, ge=1, description="images are downscaled to at most this")
    freeze_vision_tower: bool = Field(True, description="keep the vision encoder frozen")
    freeze_projector: bool = Field(True, description="keep the vision-language merger frozen")
    freeze_embeddings: bool = Field(
        False, description="full fine-tune: keep token embeddings (and a tied LM head) frozen"
    )


class DPOConfig(_Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature on the log-ratio margin")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="conservative DPO: assumed label noise"
    )


class RLConfig(_Section):
    reward: Name = Field(
        "exact_match", description="built-in name, module:function, or file.py:function"
    )
    reward_regex: Name | None = Field(
        None, description="pattern for the built-in regex_match reward"
    )
    group_size: int = Field(4, ge=2, description="completions sampled per prompt")
    prompts_per_step: int = Field(8, ge=1, description="prompts (groups) per optimizer step")
    loss: Literal["importance_sampling", "ppo"] = Field(
        "importance_sampling", description="policy-gradient loss"
    )
    clip_low: float = Field(0.2, ge=0, lt=1, description="ppo: lower ratio clip (1 - clip_low)")
    clip_high: float = Field(0.2, ge=0, description="ppo: upper ratio clip (1 + clip_high)")
    normalize_advantages: bool = Field(False, description="divide advantages by the group std")
    temperature: float = Field(1.0, ge=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    # 10, not -1 (all tokens): a small or partly trained model spreads its mass over the
    # whole vocabulary, and full-vocabulary samples drove it off its answers. From a
    # 50-step digits SFT (59.7% held out), 30 RL steps at temperature 1 gave 63.9% with
    # top_k 10 but 35.6% with 20, 24.4% with all tokens, 43.6% with all at temperature
    # 0.7. A trained model keeps nearly all its mass in its top 10 anyway.
    top_k: int = Field(
        10, ge=-1, description="sample among the k most likely tokens only (-1: all tokens)"
    )
    max_tokens: int = Field(32, ge=1, description="tokens sampled per completion")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="extra stop strings"
    )
    kl_coef: float = Field(0.0, ge=0, description="KL penalty against the reference model (0: off)")


# The trackers ``[logging] report_to`` may name, each an optional extra of the same name
# (``pip install 'vlmtune[wandb]'``); ``recipes/trackers.py`` drives them.
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
TrackerName = Literal["tensorboard", "wandb", "mlflow", "trackio"]


def _no_nul(value: str) -> str:
    # Valid TOML, but no file name can hold it: refused here rather than by mkdir mid-setup.
    if "\x00" in value:
        raise ValueError("contains a NUL byte (\\x00), which no file path can hold")
    return value


class LoggingConfig(_Section):
    report_to: list[TrackerName] = Field(
        default_factory=list,
        description="experiment trackers that get every number of metrics.jsonl at its step "
        "and the job as it ran: tensorboard, wandb, mlflow, trackio (each an optional extra, "
        "e.g. pip install 'vlmtune[wandb]'); [] (default): metrics.jsonl only",
    )
    project: Name | None = Field(
        None,
        description="W&B and trackio project, MLflow experiment (unset: job.name, else the "
        "run directory's name)",
    )
    run_name: Name | None = Field(
        None, description="the run's name in every tracker (unset: the run directory's name)"
    )
    tags: list[Name] = Field(default_factory=list, description="W&B tags and MLflow tags")
    log_dir: Annotated[Name, AfterValidator(_no_nul)] | None = Field(
        None,
        description="TensorBoard's event folder (unset: <run directory>/tensorboard); a "
        "relative path is from the working directory, as job.output_dir is",
    )
    mlflow_tracking_uri: Name | None = Field(
        None,
        description="MLflow server or store, e.g. http://host:5000 or sqlite:///mlflow.db "
        "(unset: MLFLOW_TRACKING_URI, else sqlite:///<run directory>/mlflow.db)",
    )
    wandb_mode: Literal["online", "offline"] | None = Field(
        None,
        description="online (needs an API key: wandb login or WANDB_API_KEY) or offline "
        "(files in <run directory>/wandb, for wandb sync); unset: WANDB_MODE, else online",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, value: object) -> object:
        # One message naming the choices, not one per Literal member; a lone name is
        # a list of one, and naming a tracker twice starts it once.
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"must be a list of tracker names ({', '.join(TRACKERS)})")
        unknown = [v for v in value if v not in TRACKERS]
        if unknown:
            raise ValueError(
                f"unknown tracker {unknown[0]!r}; use {', '.join(TRACKERS[:-1])} or {TRACKERS[-1]}"
            )
        return list(dict.fromkeys(value))


class JobFile(_Section):
    """A whole TOML job file."""

    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    job: JobConfig
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    hyperparameters: HyperparametersConfig = Field(default_factory=HyperparametersConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    # What load_job resolved from the hosted trainer's keys (printed like vision defaults).
    _resolved: list[SettingChange] = PrivateAttr(default_factory=list)
    _ignored: list[str] = PrivateAttr(default_factory=list)

    @property
    def resolved_settings(self) -> list[SettingChange]:
        """Settings moved or resolved from the hosted trainer's keys (old -> new, why)."""
        return list(self._resolved)

    @property
    def ignored_keys(self) -> list[str]:
        """Hosted-trainer keys accepted but not used, each with the reason."""
        return list(self._ignored)

    @property
    def finetune_mode(self) -> Literal["full", "lora", "qlora"]:
        variety = self.algorithm.variety
        return "full" if variety == "fft" else variety


class ConfigError(ValueError):
    """Every problem with a job file, one per line, each naming its TOML key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        if len(problems) == 1:  # one mistake, one line
            super().__init__(f"{source}: {problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the job config:\n{lines}")
