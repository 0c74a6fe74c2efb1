"""`vlmtune train --nproc N`: one command launches torchrun; the run equals one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import png_data_url
from vlmtune.cli import app

runner = CliRunner()


def write_job(tmp_path: Path, extra: str = "") -> Path:
    rows = []
    for i in range(12):
        content = [
            {"type": "image_url", "image_url": {"url": png_data_url(32, 32, seed=i % 3)}},
            {"type": "text", "text": "What digit is this?"},
        ]
        if i % 4 == 3:  # some text-only rows: ranks must not hang on the vision tower
            content = f"Say {i % 3}."
        msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": str(i % 3)}]
        rows.append(json.dumps({"messages": msgs}))
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(rows[:3]) + "\n")
    toml = tmp_path / "job.toml"
    toml.write_text(
        f"""
[algorithm]
variety = "lora"
[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"
validation_data = "val.jsonl"
[hyperparameters]
n_epochs = 2
gradient_accumulation_steps = 4
learning_rate = 5e-3
sequence_length = 128
save_every = 2
max_steps = 3
eval_max_new_tokens = 2
[lora]
r = 4
[model]
min_pixels = 4096
max_pixels = 4096
{extra}
"""
    )
    return toml


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_nproc_2_run_equals_one_process_and_only_rank_0_writes(tmp_path, tiny_dir):
    toml = write_job(tmp_path)
    base = ["train", "--type", "sft", "--config", str(toml), "--output"]
    one = runner.invoke(app, [*base, str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = runner.invoke(app, [*base, str(tmp_path / "two"), "--nproc", "2"])
    assert two.exit_code == 0, two.output
    assert "launching 2 processes" in two.output

    steps_one = [r for r in records(tmp_path / "one") if "loss" in r]
    steps_two = [r for r in records(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in steps_two] == [1, 2, 3]  # one line per step: rank 0 alone
    for a, b in zip(steps_one, steps_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    evals = [r for r in records(tmp_path / "two") if "eval/loss" in r]
    assert len(evals) == 1
    assert evals[0]["eval/loss"] == pytest.approx(records(tmp_path / "one")[-1]["eval/loss"], 1e-4)

    # FSDP2 in one process ([compute] fsdp, here as an override), in a fresh process so
    # that its process group of one does not outlive the test.
    alone = subprocess.run(
        [sys.executable, "-c", "from vlmtune.cli import main; main()"]
        + [*base, str(tmp_path / "alone"), "compute.fsdp=true"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    assert "FSDP2 over 1 process)" in alone.stdout + alone.stderr
    assert "model tiny-qwen3-vl (lora; cpu float32):" in one.output  # not sharded
    steps_alone = [r for r in records(tmp_path / "alone") if "loss" in r]
    for a, b in zip(steps_one, steps_alone, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)

    shards = sorted(p.name for p in (tmp_path / "two/checkpoints/step-2/dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    final = tmp_path / "two" / "final"
    assert (final / "adapter_config.json").exists()
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), final)


def test_dry_run_prints_the_torchrun_command_of_every_node(tmp_path):
    toml = write_job(tmp_path, '[compute]\ngpu_type = "cpu"\ngpu_count = 2\nnodes = 3')
    result = runner.invoke(
        app, ["train", "--config", str(toml), "--dry-run", "training.device=cpu"]
    )
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if "torch.distributed.run" in x]
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        assert "VLMTUNE_LAUNCHED=1" in line
        assert "--nnodes=3" in line and f"--node-rank={rank}" in line
        assert "--nproc-per-node 2" in line and "--rdzv-endpoint=" in line
        assert line.rstrip().endswith("training.device=cpu")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[compute]\ngpu_count = 4", ["compute.gpu_count", "--nproc"]),
        ("[compute]\ncpu_offload = true", ["compute.cpu_offload"]),
        (
            '[training]\nattention = "flash_attention_2"',
            ["training.attention: flash_attention_2 needs a CUDA GPU"],
        ),
    ],
    ids=["gpus", "cpu_offload", "flash_attention"],
)
def test_gpu_only_settings_on_a_cpu_machine_are_config_errors(tmp_path, extra, expected):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    toml = write_job(tmp_path, extra)
    result = runner.invoke(app, ["train", "--config", str(toml)])
    assert result.exit_code == 2
    for text in expected:
        assert text in result.output


def test_a_cpu_shape_launches_its_process_count(tmp_path):
    toml = write_job(tmp_path)
    text = toml.read_text().replace('model = "tiny-qwen3-vl"\n', "")
    text = text.replace("sequence_length = 128\n", "")
    toml.write_text(text + '[compute]\nshape = "tiny-2k-cpu2"\n')
    result = runner.invoke(app, ["train", "--config", str(toml), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "launching 2 processes" in result.output and "--standalone" in result.output
