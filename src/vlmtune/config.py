"""The TOML job file: typed, validated before any work, every problem reported at once.

The schema is the one users already write for hosted Qwen3-VL fine-tuning
(``[algorithm]``, ``[job]``, ``[compute]``, ``[training]``, ``[hyperparameters]``,
``[lora]``, ``[model]``). Unknown keys, wrong types and contradictions all end up in
one ``ConfigError`` whose lines name the TOML key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from vlmtune.settings import SettingChange


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AlgorithmConfig(_Section):
    type: Literal["offline", "online"] = Field(
        "offline", description="offline (SFT, DPO) or online (RL)"
    )
    method: Literal["sft", "dpo", "rl"] = Field("sft", description="training method")
    variety: Literal["lora", "qlora", "fft"] = Field(
        "lora", description="lora, qlora or fft (full fine-tune)"
    )


class JobConfig(_Section):
    model: str = Field(
        description="base model: a Hugging Face id (downloaded into the HF cache on first use), "
        "a registry alias such as 'qwen3-vl-8b', a hosted name such as "
        "'accounts/fireworks/models/qwen3-vl-8b-instruct', 'tiny-qwen3-vl', or a model "
        "directory (a relative one resolves from the TOML's folder)"
    )
    revision: str | None = Field(
        None,
        description="branch, tag or commit of the Hugging Face model to use (None: its default "
        "branch); pin a commit to make the run reproducible",
    )
    data: str = Field(description="training JSONL (relative paths resolve from the TOML's folder)")
    validation_data: str | None = Field(None, description="held-out JSONL for in-training eval")
    name: str | None = Field(None, description="run name: the run directory is <output_dir>/<name>")
    output_dir: str = Field("runs", description="parent of run directories")
    image_root: str | None = Field(None, description="allow local image paths under this folder")


class ComputeConfig(_Section):
    gpu_type: str = Field("auto", description="GPU model, e.g. H100; 'auto' detects")
    gpu_count: int = Field(1, ge=1, description="GPUs per node")
    nodes: int = Field(1, ge=1, description="number of nodes")
    shape: str | None = Field(
        None, description="training shape (see `vlmtune shapes`); sets the keys it owns"
    )
    training_shape_ref: str | None = Field(None, description="the SDK's name for compute.shape")
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
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    attention: Literal["sdpa", "flash_attention_2"] = Field(
        "sdpa",
        description="attention kernel: sdpa (any device; a packed row builds a T x T mask), "
        "or flash_attention_2 (CUDA and the flash-attn package; varlen, no mask)",
    )
    image_workers: int | None = Field(
        None, ge=0, description="image preprocessing processes (unset: auto, 0: in-process)"
    )
    image_cache_dir: str | None = Field(
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
    seed: int = Field(42, description="data order and initialisation seed")
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
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description='module names, or "all-linear" (also as ["all-linear"])'
    )

    @field_validator("target_modules")
    @classmethod
    def _all_linear_in_a_list(cls, value: list[str] | str) -> list[str] | str:
        # The hosted trainer's files (and peft users) write ["all-linear"].
        return "all-linear" if value == ["all-linear"] else value


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
    reward: str = Field(
        "exact_match", description="built-in name, module:function, or file.py:function"
    )
    reward_regex: str | None = Field(
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
    stop: list[str] = Field(default_factory=list, description="extra stop strings")
    kl_coef: float = Field(0.0, ge=0, description="KL penalty against the reference model (0: off)")


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
        return {"fft": "full", "lora": "lora", "qlora": "qlora"}[self.algorithm.variety]  # type: ignore[return-value]


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


def _format_pydantic(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            out.append(f"{key}: unknown key")
        elif e["type"] == "missing":
            out.append(f"{key}: required key is missing")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            out.append(f"{key}: {e['msg']}{shown}")
    return out


def _contradictions(job: JobFile, method: str | None) -> list[str]:
    problems = []
    variety, t = job.algorithm.variety, job.training
    expected_mode = job.finetune_mode
    if t.mode is not None and t.mode != expected_mode:
        problems.append(
            f"training.mode: {t.mode!r} contradicts algorithm.variety = {variety!r} (which means {expected_mode!r})"
        )
    if t.use_qlora and variety != "qlora":
        problems.append(f"training.use_qlora: true contradicts algorithm.variety = {variety!r}")
    several = job.compute.gpu_count * job.compute.nodes > 1
    if variety == "qlora" and several and job.compute.sharding != "replicate":
        problems.append(
            f"compute.sharding: {job.compute.sharding!r} shards weights with FSDP2, which "
            '4-bit weights cannot be; qlora trains data-parallel (sharding = "replicate")'
        )
    if method is not None and method != job.algorithm.method:
        problems.append(
            f"algorithm.method: {job.algorithm.method!r} but the command asks for --type {method}"
        )
    if job.algorithm.method == "rl" and job.algorithm.type != "online":
        problems.append('algorithm.type: RL is online training; set type = "online"')
    if job.algorithm.method in ("sft", "dpo") and job.algorithm.type != "offline":
        problems.append(
            f'algorithm.type: {job.algorithm.method} is offline training; set type = "offline"'
        )
    m = job.model
    if m.min_pixels is not None and m.max_pixels is not None and m.min_pixels > m.max_pixels:
        problems.append(
            f"model.min_pixels: {m.min_pixels} is larger than model.max_pixels = {m.max_pixels}"
        )
    if job.compute.shape_name is not None:
        from vlmtune.planning.shapes import get_shape

        shape = get_shape(job.compute.shape_name)
        if expected_mode not in shape.modes:
            problems.append(
                f"algorithm.variety: {variety!r} is not validated on training shape "
                f"{shape.name!r} (it supports {', '.join(shape.modes)})"
            )
    return problems


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` with a TOML value (bare words are strings)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed file, or a ConfigError that says why it cannot be read as a job."""
    source = str(path)
    if path.is_dir():
        raise ConfigError(source, ["is a folder, not a TOML job file"])
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except PermissionError:
        raise ConfigError(source, ["cannot be read (permission denied)"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"not a text file (byte {e.start} is not UTF-8)"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"not valid TOML: {e}"]) from None


def _set_override(raw: dict[str, Any], keys: list[str], value: Any) -> list[str]:
    """Apply one ``a.b.c=value`` override; a path through a non-table is a problem."""
    node = raw
    for depth, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            where = ".".join(keys[: depth + 1])
            return [f"{'.'.join(keys)}: {where} is a value ({node!r}), not a section"]
    node[keys[-1]] = value
    return []


def load_job(
    path: str | Path, overrides: list[str] | None = None, method: str | None = None
) -> JobFile:
    """Read, override and validate a job file; raise ``ConfigError`` listing every problem."""
    path = Path(path)
    source = str(path)
    raw = _read_toml(path)
    problems: list[str] = []
    for item in overrides or []:
        try:
            keys, value = parse_override(item)
        except ValueError as e:
            problems.append(str(e))
            continue
        problems += _set_override(raw, keys, value)
    from vlmtune.job_dialect import translate
    from vlmtune.planning.shapes import apply_shape

    dialect = translate(raw)  # the hosted trainer's keys, before validation
    problems += dialect.problems
    shape_problems = apply_shape(raw)  # before validation: a shape may supply job.model
    if shape_problems:
        raise ConfigError(source, problems + shape_problems)
    try:
        job = JobFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, problems + _format_pydantic(e)) from None
    problems += _contradictions(job, method)
    if problems:
        raise ConfigError(source, problems)
    job._resolved = [*dialect.changes]
    job._ignored = [str(i) for i in dialect.ignored]
    base = path.parent
    for attr in ("data", "validation_data", "image_root"):
        value = getattr(job.job, attr)
        if value is not None and not Path(value).is_absolute():
            setattr(job.job, attr, str((base / value).resolve()))
    job.job.model = _model_from_toml_dir(job.job.model, base)
    return job


def _model_from_toml_dir(model: str, toml_dir: Path) -> str:
    """A relative model directory, as the TOML's folder sees it; names and hub ids as given.

    ``./x`` and ``../x`` are paths whether or not they exist (so an error names the
    directory tried); another relative name is a path only if that directory exists.
    """
    path = Path(model).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = toml_dir / path
    if model.startswith(("./", "../", ".\\", "..\\")) or candidate.is_dir():
        return str(candidate.resolve())
    return model


def dump_toml(job: JobFile) -> str:
    """The resolved job as TOML (written next to every run).

    Keys a training shape owns are written as comments: the file stays loadable
    (setting them as well as the shape is an error) and still shows their values.
    """
    owned: set[str] = set()
    if job.compute.shape_name is not None:
        from vlmtune.planning.shapes import get_shape

        owned = set(get_shape(job.compute.shape_name).owned_keys())
    lines: list[str] = []
    for section, model in job.model_dump().items():
        lines.append(f"[{section}]")
        for key, value in model.items():
            if value is not None:
                prefix = "# (from the shape) " if f"{section}.{key}" in owned else ""
                lines.append(f"{prefix}{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    import json

    return json.dumps(str(v))
