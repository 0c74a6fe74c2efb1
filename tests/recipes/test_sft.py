"""SFT recipe end to end on the tiny model: run dir, resume equality, final/ loading, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import png_data_url
from tests.tiny_job import tiny_job
from vlmtune.cli import app

runner = CliRunner()


def write_rows(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            label = i % 3
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {
                                        "type": "image_url",
                                        "image_url": {"url": png_data_url(32, 32, seed=label)},
                                    },
                                    {"type": "text", "text": "What digit is this?"},
                                ],
                            },
                            {"role": "assistant", "content": str(label)},
                        ]
                    }
                )
                + "\n"
            )
        f.write("not json\n")  # a bad row is dropped and reported, never fatal


def job_file(tmp_path: Path, variety: str = "lora", extra: str = "") -> Path:
    write_rows(tmp_path / "train.jsonl", 12)
    write_rows(tmp_path / "val.jsonl", 3)
    toml = tmp_path / "job.toml"
    toml.write_text(
        tiny_job(
            algorithm=f'variety = "{variety}"',
            job='validation_data = "val.jsonl"',
            hyperparameters="n_epochs = 2\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\n"
            "save_every = 2\neval_max_new_tokens = 3",
            extra=extra,
        )
    )
    return toml


def train(toml: Path, out: Path, *args: str):
    result = runner.invoke(
        app, ["train", "--type", "sft", "--config", str(toml), "--output", str(out), *args]
    )
    assert result.exit_code == 0, result.output
    return result


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
def test_lora_run_dir_resume_and_final_loads(tmp_path):
    toml = job_file(tmp_path)
    run_a = tmp_path / "run_a"
    result = train(toml, run_a)
    assert "vision default: hyperparameters.gradient_accumulation_steps: 4 -> 8" in result.output
    curve = losses(run_a)
    assert len(curve) == 4  # 12 rows / 8 per step = 2 steps per epoch, 2 epochs

    report = json.loads((run_a / "validation_report.json").read_text())
    assert report["train"]["valid"] == 12
    assert report["train"]["dropped"][0]["line"] == 13
    assert (run_a / "config.toml").exists()
    assert (run_a / "checkpoints" / "step-2" / "state.json").exists()
    summary = json.loads((run_a / "summary.json").read_text())
    assert 0.0 <= summary["eval/accuracy"] <= 1.0

    # An interruption after step 2: only the step-2 checkpoint and 3 metric lines survive.
    run_b = tmp_path / "run_b"
    shutil.copytree(run_a / "checkpoints", run_b / "checkpoints")
    lines = (run_a / "metrics.jsonl").read_text().splitlines()[:3]
    (run_b / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train(toml, run_b, "--resume")
    assert losses(run_b) == pytest.approx(curve, rel=1e-5)

    # final/ is a LoRA adapter with processor files; transformers + peft load it.
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    final = run_a / "final"
    assert (final / "adapter_config.json").exists()
    processor = AutoProcessor.from_pretrained(final)
    assert processor.image_processor.size["shortest_edge"] == 4096
    from vlmtune.models.tiny import tiny_model_dir

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir())
    model = PeftModel.from_pretrained(base, final)

    # export --merge folds the adapter in: same logits, plain HF directory.
    merged_dir = tmp_path / "merged"
    res = runner.invoke(app, ["export", str(final), "--merge", str(merged_dir)])
    assert res.exit_code == 0, res.output
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    AutoProcessor.from_pretrained(merged_dir)
    ids = torch.tensor([[151644, 872, 198, 40, 151645]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


@pytest.mark.slow
def test_full_finetune_final_loads_with_auto_classes_and_evals(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    toml = job_file(tmp_path, variety="fft")
    run = tmp_path / "run"
    train(toml, run, "hyperparameters.n_epochs=1", "hyperparameters.save_every=0")
    AutoModelForImageTextToText.from_pretrained(run / "final")
    AutoProcessor.from_pretrained(run / "final")
    res = runner.invoke(
        app,
        ["eval", "--model", str(run / "final"), "--data", str(tmp_path / "val.jsonl"), "--json"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n"] == 3 and 0.0 <= out["accuracy"] <= 1.0


def test_sft_run_from_python_applies_the_vision_defaults(tmp_path):
    """``sft.run(job, ...)`` without the CLI: the per-device batch of 1 and the
    accumulation that keeps the effective batch (2 -> 8) shape the run, and precision
    "auto" is this device's (fp32 on a CPU)."""
    from vlmtune.config import load_job
    from vlmtune.recipes import sft

    write_rows(tmp_path / "train.jsonl", 9)
    (tmp_path / "job.toml").write_text(
        """
[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"
[hyperparameters]
gradient_accumulation_steps = 2
sequence_length = 128
[lora]
r = 4
[model]
min_pixels = 4096
max_pixels = 4096
"""
    )
    logs: list[str] = []
    summary = sft.run(load_job(tmp_path / "job.toml"), tmp_path / "run", log=logs.append)
    assert any(
        x.startswith("vision default: hyperparameters.gradient_accumulation_steps: 2 -> 8 (")
        for x in logs
    ), logs
    assert summary["steps"] == 2  # 9 examples, 8 a step (5 steps of 2 without the defaults)
    assert "gradient_accumulation_steps = 8" in (tmp_path / "run" / "config.toml").read_text()
    if not torch.cuda.is_available():
        change = "training.precision: 'auto' -> 'fp32' (no bf16 on this cpu: fp32)"
        assert f"vision default: {change}" in logs
        assert any("(lora; cpu float32)" in x for x in logs)  # the engine's describe()


def test_bad_config_is_refused_before_any_work(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text(
        '[job]\nmodel = "tiny-qwen3-vl"\ndata = "missing.jsonl"\n[hyperparameters]\nlearning_rate = -1\nfoo = 1\n'
    )
    res = runner.invoke(app, ["train", "--config", str(toml), "--output", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert (
        "hyperparameters.learning_rate" in res.output
        and "hyperparameters.foo: unknown key" in res.output
    )
    assert not (tmp_path / "run").exists()


def test_compute_problems_are_refused(tmp_path):
    write_rows(tmp_path / "train.jsonl", 2)
    toml = tmp_path / "big.toml"
    toml.write_text(
        '[algorithm]\nvariety = "qlora"\n[job]\nmodel = "Qwen/Qwen3-VL-235B-A22B-Instruct"\ndata = "train.jsonl"\n'
    )
    res = runner.invoke(app, ["train", "--config", str(toml), "--output", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "needs at least" in res.output
    if not torch.cuda.is_available():
        assert "qlora needs a CUDA GPU" in res.output


def test_saved_dirs_keep_their_pixel_limits_and_adapters_load(tmp_path, tiny_dir):
    """eval/sampling on a run's final/ uses the limits it was trained with, and a LoRA
    final/ (an adapter dir) loads for inference (merged) and for more LoRA training."""
    from vlmtune.engine.engine import EngineConfig, TrainingEngine

    lora = TrainingEngine(
        EngineConfig(
            base_model=str(tiny_dir), mode="lora", lora_rank=4, min_pixels=4096, max_pixels=4096
        )
    )
    with torch.no_grad():  # make the adapter non-trivial
        for n, p in lora.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    final = lora.save_weights_for_sampler(tmp_path / "final")
    ids = torch.tensor([[151644, 872, 198, 40, 151645]])
    with torch.no_grad():
        expected = lora.model(input_ids=ids).logits

    merged = TrainingEngine(EngineConfig(base_model=str(final), mode="full"))
    assert (
        merged.image_preprocessor.min_pixels == 4096
        and merged.image_preprocessor.max_pixels == 4096
    )
    again = TrainingEngine(EngineConfig(base_model=str(final), mode="lora"))
    assert any(p.requires_grad for n, p in again.model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        torch.testing.assert_close(
            merged.model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            again.model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4
        )
