"""Vision defaults change only the settings the job's method reads."""

import pytest

from vlmtune.config import JobFile
from vlmtune.defaults import apply_vision_defaults


def job_for(method: str) -> JobFile:
    """Every key a vision default may change set to a value it changes."""
    return JobFile.model_validate(
        {
            "algorithm": {"method": method, "type": "online" if method == "rl" else "offline"},
            "job": {"model": "tiny-qwen3-vl", "data": "train.jsonl"},
            "training": {"precision": "fp16"},
            "hyperparameters": {
                "per_device_batch": 4,
                "gradient_accumulation_steps": 1,
                "group_by_length": True,
                "pin_memory": True,
            },
        }
    )


HP = "hyperparameters."


@pytest.mark.parametrize(
    ("method", "changed"),
    [
        # SFT as before: the micro-batch, the accumulation keeping its batch, loading switches
        (
            "sft",
            {
                HP + "per_device_batch": (4, 1),
                HP + "gradient_accumulation_steps": (1, 8),
                "training.precision": ("fp16", "fp32"),
                HP + "group_by_length": (True, False),
                HP + "pin_memory": (True, False),
            },
        ),
        # DPO's step is per_device_batch x gradient_accumulation_steps pairs; no loader
        (
            "dpo",
            {
                HP + "per_device_batch": (4, 1),
                HP + "gradient_accumulation_steps": (1, 8),
                "training.precision": ("fp16", "fp32"),
            },
        ),
        # RL's step is prompts_per_step x group_size: no accumulation change to print
        (
            "rl",
            {HP + "per_device_batch": (4, 1), "training.precision": ("fp16", "fp32")},
        ),
    ],
)
def test_vision_defaults_touch_only_keys_the_method_reads(method, changed):
    job = job_for(method)
    changes = apply_vision_defaults(job, supports_vision=True, device_type="cpu", bf16_ok=False)
    assert {c.key: (c.old, c.new) for c in changes} == changed
    # keys left alone keep the user's value
    assert job.hyperparameters.gradient_accumulation_steps == (1 if method == "rl" else 8)
    assert job.hyperparameters.pin_memory is (method != "sft")


def test_the_method_argument_wins_over_the_job_file():
    job = job_for("sft")
    changes = apply_vision_defaults(
        job, supports_vision=True, device_type="cpu", bf16_ok=False, method="rl"
    )
    assert HP + "gradient_accumulation_steps" not in {c.key for c in changes}
