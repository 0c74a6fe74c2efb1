"""Settings a vision model needs, applied to a job and reported (old -> new, and why).

Images make examples long and uneven, so the per-device batch is clamped to 1 and
gradient accumulation restores the effective batch; fp16 overflows in the vision
tower, so bf16 is used where the device has it (fp32 elsewhere); length grouping and
pinned memory interact badly with variable-size pixel tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmtune.config import JobFile

MIN_GRAD_ACCUM_FOR_VISION = 8


@dataclass(frozen=True)
class SettingChange:
    key: str
    old: Any
    new: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r} ({self.reason})"


def apply_vision_defaults(
    job: JobFile, *, supports_vision: bool, device_type: str, bf16_ok: bool
) -> list[SettingChange]:
    """Mutate ``job`` in place; return every change made (nothing is changed silently)."""
    if not supports_vision:
        return []
    changes: list[SettingChange] = []
    hp, tr = job.hyperparameters, job.training

    def change(section: Any, name: str, key: str, new: Any, reason: str) -> None:
        old = getattr(section, name)
        if old != new:
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
    if tr.precision in ("auto", "fp16"):
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
