"""A diverging run stops: the step named, no final/, the last checkpoint intact, and
metrics.jsonl / summary.json strict JSON (no NaN or Infinity literals)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.recipes.test_dpo import write_dpo_job
from tests.recipes.test_sft import job_file
from vlmtune.cli import app
from vlmtune.recipes.common import latest_checkpoint
from vlmtune.recipes.run_dir import RunDir
from vlmtune.sdk import ServiceClient

runner = CliRunner()
# Adam moves every weight by about the learning rate on step 1: step 2 overflows.
HUGE_LR = [
    "hyperparameters.learning_rate=1e30",
    "hyperparameters.warmup_ratio=0",
    "hyperparameters.lr_scheduler=constant",
]


def refuse_constant(name: str) -> float:
    raise ValueError(f"not strict JSON: {name}")


def strict_lines(path: Path) -> list[dict]:
    return [
        json.loads(line, parse_constant=refuse_constant) for line in path.read_text().splitlines()
    ]


def test_metrics_and_summary_write_non_finite_numbers_as_null(tmp_path):
    run = RunDir(tmp_path, main=True)
    metrics = run.metrics(None, total_steps=2)
    metrics.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    metrics.write({"step": 2, "eval": {"loss": float("-inf"), "n": [1.0, float("nan")]}})
    run.write_summary({"final_loss": float("nan"), "steps": 2})

    first, second = strict_lines(tmp_path / "metrics.jsonl")
    assert first == {"step": 1, "total_steps": 2, "loss": None, "grad_norm": None, "lr": 1e-3}
    assert second["eval"] == {"loss": None, "n": [1.0, None]}
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse_constant)
    assert summary == {"final_loss": None, "steps": 2}
    # a resume reads the file back (and cuts it) without tripping on the nulls
    run.metrics(1, total_steps=2)
    assert [r["step"] for r in strict_lines(tmp_path / "metrics.jsonl")] == [1]


def test_sft_with_a_huge_learning_rate_stops_and_keeps_the_last_checkpoint(tmp_path, tiny_dir):
    toml = job_file(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--type", "sft", "--config", str(toml), "--output", str(out)]
    result = runner.invoke(app, [*args, *HUGE_LR, "hyperparameters.save_every=1"])

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert "Traceback" not in result.output
    assert "training stopped: step 2: grad_norm is nan" in result.output
    assert "learning rate (1e+30) is likely too high" in result.output
    assert "the last good (finite) checkpoint is checkpoints/step-1" in result.output
    assert not (out / "final").exists()
    assert not (out / "summary.json").exists()
    records = strict_lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1]  # the refused step is not recorded

    # The checkpoint before the divergence is whole: it loads, and its weights are finite.
    ckpt = latest_checkpoint(out)
    assert ckpt == str(out / "checkpoints" / "step-1")
    tc = ServiceClient(checkpoint_root=tmp_path / "ck").create_lora_training_client(
        str(tiny_dir), rank=4
    )
    assert tc.load_state(ckpt).result() == {"step": 1}
    weights = [p for p in tc.engine.trainable_params]
    assert weights and all(bool(torch.isfinite(p).all()) for p in weights)
    assert any(p.abs().max() > 1e20 for p in weights)  # it did take the huge step


def test_dpo_with_a_huge_learning_rate_stops_without_final(tmp_path):
    toml = write_dpo_job(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--type", "dpo", "--config", str(toml), "--output", str(out)]
    result = runner.invoke(app, [*args, *HUGE_LR])

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "training stopped: step 2:" in result.output
    assert "checkpoints/step-1" in result.output
    assert not (out / "final").exists()
    for record in strict_lines(out / "metrics.jsonl"):
        assert all(not isinstance(v, float) or math.isfinite(v) for v in record.values())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_check_finite_names_the_value(value):
    from vlmtune.engine.divergence import DivergedError, check_finite

    check_finite(loss=1.0, grad_norm=None)  # None: no optimizer step this time (RL)
    with pytest.raises(DivergedError, match=f"loss is {value}"):
        check_finite(loss=value, grad_norm=2.0)
