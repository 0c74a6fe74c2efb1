"""The hosted Qwen3-VL trainer's job files, read as vlmtune's own schema.

Users of the hosted trainer paste its job files unchanged. Each of its keys that
vlmtune's schema spells differently is either *used* (moved to vlmtune's key and
reported old -> new, as the vision defaults are) or *ignored* with the reason (it
steers machinery vlmtune does not have); none is refused. This runs on the raw TOML
before validation, so a moved value is validated exactly like one the user wrote, and
the error names the key the user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmtune.settings import SettingChange


@dataclass(frozen=True)
class IgnoredKey:
    key: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value!r} is ignored ({self.reason})"


@dataclass
class Translation:
    changes: list[SettingChange]
    ignored: list[IgnoredKey]
    problems: list[str]


# hosted key -> vlmtune key. The hosted files keep LoRA and evaluation settings under
# [hyperparameters] (and [hyperparameters.parallelism]); vlmtune has a section for each.
MOVED_KEYS: dict[str, str] = {
    "hyperparameters.batch_size": "hyperparameters.per_device_batch",
    "hyperparameters.lora_rank": "lora.r",
    "hyperparameters.lora_alpha": "lora.alpha",
    "hyperparameters.lora_dropout": "lora.dropout",
    "hyperparameters.lora_target_modules": "lora.target_modules",
    "hyperparameters.eval_steps": "hyperparameters.eval_every",
    "hyperparameters.parallelism.eval_steps": "hyperparameters.eval_every",
    "hyperparameters.parallelism.activation_checkpointing": "training.gradient_checkpointing",
}

# hosted key -> why vlmtune has nothing for it to steer.
IGNORED_KEYS: dict[str, str] = {
    "hyperparameters.parallelism.use_deepspeed": (
        "vlmtune shards with torch FSDP2 (compute.sharding), not DeepSpeed"
    ),
    "hyperparameters.parallelism.bf16": (
        "training.precision = 'auto' already computes in bf16 on GPUs that have it"
    ),
    "hyperparameters.parallelism.tensor_parallel_size": (
        "no tensor parallelism: FSDP2 shards every layer over all processes instead"
    ),
    "hyperparameters.parallelism.pipeline_parallel_size": (
        "no pipeline parallelism: FSDP2 shards every layer over all processes instead"
    ),
    "hyperparameters.parallelism.evaluation_strategy": (
        "evaluation runs every hyperparameters.eval_every steps (0: at the end)"
    ),
    "hyperparameters.evaluation_strategy": (
        "evaluation runs every hyperparameters.eval_every steps (0: at the end)"
    ),
    "hyperparameters.parallelism.save_best_model_at_end": (
        "final/ holds the last step's weights; every checkpoint is kept under checkpoints/"
    ),
    "hyperparameters.parallelism.metric_for_best_model": (
        "final/ holds the last step's weights; eval metrics are in metrics.jsonl"
    ),
    "data.topology": "the hosted service's cluster layout; torchrun sets vlmtune's",
    "tags": "labels for the hosted service's job list; name a run with job.name",
}

# hyperparameters.train_kind -> algorithm.variety
TRAIN_KINDS = {"peft": "lora", "lora": "lora", "qlora": "qlora", "fft": "fft", "full": "fft"}
# [training] mode values that name a method rather than a fine-tuning variety.
METHOD_MODES = {"sft_offline", "dpo_offline", "rl_online", "sft", "dpo", "rl", "grpo"}
# DeepSpeed ZeRO stage -> the FSDP2 setting that shards the same state.
ZERO_STAGE_SHARDING = {2: "shard_grad_op", 3: "full_shard"}

QLORA_REASON = "training.use_qlora = true: LoRA on a 4-bit base (QLoRA)"
REPLICATE_REASON = (
    "4-bit weights are not sharded: each GPU holds the whole 4-bit base and all-reduces "
    "only the LoRA gradients"
)


def get_dotted(raw: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """(whether ``a.b.c`` is set in a raw TOML dict, its value)."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _pop(raw: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[last]
    if parents and node == {}:  # an emptied [hyperparameters.parallelism] goes too
        _pop(raw, ".".join(parents))


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def translate(raw: dict[str, Any]) -> Translation:
    """Rewrite ``raw`` (a parsed TOML job) in place into vlmtune's schema."""
    out = Translation([], [], [])

    def move(src: str, dst: str, value: Any, reason: str) -> None:
        present, current = get_dotted(raw, dst)
        _pop(raw, src)
        if present and current != value:
            out.problems.append(
                f"{src}: {value!r} contradicts {dst} = {current!r} (the same setting)"
            )
            return
        _set(raw, dst, value)
        out.changes.append(SettingChange(dst, current if present else None, value, reason))

    for src, dst in MOVED_KEYS.items():
        present, value = get_dotted(raw, src)
        if present:
            move(src, dst, value, f"from {src}")

    present, kind = get_dotted(raw, "hyperparameters.train_kind")
    if present:
        variety = TRAIN_KINDS.get(str(kind).lower())
        if variety is None:
            out.problems.append(
                f"hyperparameters.train_kind: {kind!r} is not one of {', '.join(TRAIN_KINDS)}"
            )
            _pop(raw, "hyperparameters.train_kind")
        else:
            move("hyperparameters.train_kind", "algorithm.variety", variety, f"train_kind {kind!r}")

    present, stage = get_dotted(raw, "hyperparameters.parallelism.deepspeed_stage")
    if present:
        _pop(raw, "hyperparameters.parallelism.deepspeed_stage")
        sharding = ZERO_STAGE_SHARDING.get(stage) if isinstance(stage, int) else None
        if sharding is None:
            reason = "ZeRO 0/1 keep whole weights per GPU; FSDP2 shards (compute.sharding)"
            out.ignored.append(
                IgnoredKey("hyperparameters.parallelism.deepspeed_stage", stage, reason)
            )
        elif not get_dotted(raw, "compute.sharding")[0]:
            _set(raw, "compute.sharding", sharding)
            out.changes.append(
                SettingChange("compute.sharding", None, sharding, f"FSDP2's ZeRO-{stage} sharding")
            )

    present, mode = get_dotted(raw, "training.mode")
    if present and str(mode) in METHOD_MODES:
        _pop(raw, "training.mode")
        reason = "the method is algorithm.method (and train --type)"
        out.ignored.append(IgnoredKey("training.mode", mode, reason))

    for key, reason in IGNORED_KEYS.items():
        present, value = get_dotted(raw, key)
        if present:
            _pop(raw, key)
            out.ignored.append(IgnoredKey(key, value, reason))

    _resolve_qlora(raw, out)
    return out


def _resolve_qlora(raw: dict[str, Any], out: Translation) -> None:
    """``variety = "lora"`` with ``use_qlora = true`` is QLoRA; it trains data-parallel.

    Anything else that contradicts QLoRA (``mode = "full"``, ``variety = "fft"``) is
    left for the schema's contradiction check to report.
    """
    _, use_qlora = get_dotted(raw, "training.use_qlora")
    has_variety, variety = get_dotted(raw, "algorithm.variety")
    has_mode, mode = get_dotted(raw, "training.mode")
    if use_qlora is True and variety in (None, "lora") and mode in (None, "lora", "qlora"):
        _set(raw, "algorithm.variety", "qlora")
        out.changes.append(
            SettingChange(
                "algorithm.variety", variety if has_variety else None, "qlora", QLORA_REASON
            )
        )
        if has_mode and mode == "lora":
            _set(raw, "training.mode", "qlora")
            out.changes.append(SettingChange("training.mode", "lora", "qlora", QLORA_REASON))
    _, variety = get_dotted(raw, "algorithm.variety")
    _, gpus = get_dotted(raw, "compute.gpu_count")
    _, nodes = get_dotted(raw, "compute.nodes")
    several = (gpus or 1) != 1 or (nodes or 1) != 1
    if variety == "qlora" and several and not get_dotted(raw, "compute.sharding")[0]:
        _set(raw, "compute.sharding", "replicate")
        out.changes.append(
            SettingChange("compute.sharding", "full_shard", "replicate", REPLICATE_REASON)
        )
