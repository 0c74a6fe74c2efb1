"""Settings a vision model needs, applied to a job and reported (old -> new, and why).

Images make examples long and uneven, so the per-device batch is clamped to 1 and
gradient accumulation restores the effective batch; fp16 overflows in the vision
tower, so bf16 is used where the device has it (fp32 elsewhere); length grouping and
pinned memory interact badly with variable-size pixel tensors.

Each change applies only to the methods that read its key (``READ_BY``): RL's batch is
``rl.prompts_per_step x rl.group_size``, so a gradient-accumulation change printed for
an RL job would describe a setting the run never uses.
"""

from __future__ import annotations

from typing import Any

from vlmtune.config import JobFile
from vlmtune.settings import SettingChange

MIN_GRAD_ACCUM_FOR_VISION = 8
ALL_METHODS = frozenset({"sft", "dpo", "rl"})

# The methods that read each key a vision default may change.
READ_BY: dict[str, frozenset[str]] = {
    # the engine's micro-batch (create_training_client), whatever the method
    "hyperparameters.per_device_batch": ALL_METHODS,
    # SFT's and DPO's step is per_device_batch x gradient_accumulation_steps examples
    # (pairs); RL's is prompts_per_step x group_size and never reads it
    "hyperparameters.gradient_accumulation_steps": frozenset({"sft", "dpo"}),
    "training.precision": ALL_METHODS,
    # SFT's data-loading switches; the DPO and RL recipes have no such loader
    "hyperparameters.group_by_length": frozenset({"sft"}),
    "hyperparameters.pin_memory": frozenset({"sft"}),
}


def apply_vision_defaults(
    job: JobFile,
    *,
    supports_vision: bool,
    device_type: str | None,
    bf16_ok: bool,
    method: str | None = None,
) -> list[SettingChange]:
    """Mutate ``job`` in place; return every change made (nothing is changed silently).

    ``method`` (sft, dpo, rl; default ``algorithm.method``): keys it never reads are
    left as they are. ``device_type`` (cuda, cpu) is where the engine runs; None when
    that is not known here (a server's engine): precision is then left to that engine.
    Idempotent: a job these defaults have set up is left as it is, and no change is
    returned for it.
    """
    if not supports_vision:
        return []
    method = method or job.algorithm.method
    changes: list[SettingChange] = []
    hp, tr = job.hyperparameters, job.training

    def change(section: Any, name: str, key: str, new: Any, reason: str) -> None:
        old = getattr(section, name)
        if old != new and method in READ_BY[key]:
            setattr(section, name, new)
            changes.append(SettingChange(key, old, new, reason))

    effective = hp.per_device_batch * hp.gradient_accumulation_steps
    change(
        hp,
        "per_device_batch",
        "hyperparameters.per_device_batch",
        1,
        "vision examples vary in size",
    )
    change(
        hp,
        "gradient_accumulation_steps",
        "hyperparameters.gradient_accumulation_steps",
        max(MIN_GRAD_ACCUM_FOR_VISION, effective),
        "keeps the effective batch with a per-device batch of 1",
    )
    if tr.precision in ("auto", "fp16") and device_type is not None:
        if device_type == "cuda" and bf16_ok:
            change(tr, "precision", "training.precision", "bf16", "bf16 on a GPU that supports it")
        else:
            change(
                tr,
                "precision",
                "training.precision",
                "fp32",
                f"no bf16 on this {device_type}: fp32",
            )
    change(hp, "group_by_length", "hyperparameters.group_by_length", False, "not with images")
    change(hp, "pin_memory", "hyperparameters.pin_memory", False, "not with variable-size pixels")
    return changes


def resolved_lines(job: JobFile) -> list[str]:
    """What ``load_job`` resolved from the hosted trainer's keys, one line each, as a
    run's log and ``vlmtune plan`` show them (beside the vision defaults)."""
    return [f"job file: {x}" for x in [*job.resolved_settings, *job.ignored_keys]]


# The cap of every family vlmtune loads today (Qwen3-VL): the fallback when a model
# cannot be looked up (e.g. a LoRA adapter directory, which has no config.json).
QWEN3_VL_MAX_IMAGES_PER_MESSAGE = 1


def image_cap(model: str, configured: int | None) -> int | None:
    """The per-message image cap a run applies; ``None`` means no cap.

    ``configured`` is what the user set (``[model] max_images_per_message``, or the SDK's
    and server's ``max_images_per_message``): unset (``None``) takes the model family's
    cap, ``0`` asks for no cap, ``N`` keeps the first N images of each message. Every
    layer (recipes, engine, SDK, server, ``vlmtune data validate``) resolves it here.
    """
    if configured is not None:
        if configured < 0:
            raise ValueError(f"max_images_per_message must be >= 0 (0: no cap), got {configured}")
        return configured or None
    # Imported here: the data CLI resolves caps without paying for the registry's imports.
    from vlmtune.models.registry import UnknownModelError, get_model_spec

    try:
        return get_model_spec(model).max_images_per_message
    except (UnknownModelError, OSError, ValueError):
        return QWEN3_VL_MAX_IMAGES_PER_MESSAGE
