"""The hosted trainer's documented example job file, pasted unchanged: accepted,
resolved and reported.

``examples/hosted/ft_vl.toml`` is the hosted Qwen3-VL trainer's documented example,
verbatim. Its keys are used (moved to vlmtune's schema, old -> new) or ignored with a
reason; a value vlmtune cannot honour is refused by name. The hosted CLI's own SFT files
are tests/test_hosted_sft_files.py's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.recipes.test_sft import write_rows
from vlmtune.cli import app
from vlmtune.config import ConfigError, load_job

REPO = Path(__file__).resolve().parents[1]
HOSTED = REPO / "examples" / "hosted" / "ft_vl.toml"
runner = CliRunner()

# The hosted service's Qwen3-VL-2B example: LoRA keys under [hyperparameters], a
# DeepSpeed block, evaluation keys and [tags].
HOSTED_2B = """
[algorithm]
type = "offline"
method = "sft"
variety = "lora"
[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"
[compute]
gpu_type = "H200"
gpu_count = 2
nodes = 1
[data]
topology = {}
[training]
mode = "sft_offline"
use_qlora = false
[hyperparameters]
n_epochs = 3
batch_size = 1
gradient_accumulation_steps = 16
sequence_length = 2048
learning_rate = 5e-05
warmup_ratio = 0.03
train_kind = "peft"
lora_rank = 8
lora_alpha = 16
lora_dropout = 0.05
lora_target_modules = ["all-linear"]
[hyperparameters.parallelism]
use_deepspeed = true
deepspeed_stage = 2
bf16 = true
activation_checkpointing = true
evaluation_strategy = "steps"
eval_steps = 50
save_best_model_at_end = true
metric_for_best_model = "val.loss"
[tags]
task = "crafter"
modality = "vision"
"""


def tiny_copy(tmp_path: Path, use_qlora: bool = True) -> Path:
    """The verbatim hosted file with only model and data changed (and use_qlora)."""
    write_rows(tmp_path / "train.jsonl", 8)
    text = HOSTED.read_text()
    text = text.replace('"Qwen/Qwen3-VL-4B-Instruct"', '"tiny-qwen3-vl"')
    text = text.replace('"datasets/crafter_vl/train.jsonl"', '"train.jsonl"')
    if not use_qlora:
        text = text.replace("use_qlora = true", "use_qlora = false")
    path = tmp_path / "ft_vl.toml"
    path.write_text(text)
    return path


def test_the_verbatim_hosted_file_is_qlora_data_parallel():
    job = load_job(HOSTED)
    assert job.algorithm.variety == "qlora" and job.finetune_mode == "qlora"
    assert job.compute.sharding == "replicate"
    assert job.lora.target_modules == "all-linear"  # ["all-linear"] means the same
    changes = {c.key: (c.old, c.new) for c in job.resolved_settings}
    assert changes["algorithm.variety"] == ("lora", "qlora")
    assert changes["training.mode"] == ("lora", "qlora")
    assert changes["compute.sharding"] == ("full_shard", "replicate")
    assert "use_qlora" in str(job.resolved_settings[0])


def test_every_hosted_key_is_used_or_ignored_with_a_reason(tmp_path):
    (tmp_path / "job.toml").write_text(HOSTED_2B)
    job = load_job(tmp_path / "job.toml")
    assert (job.lora.r, job.lora.alpha, job.lora.dropout) == (8, 16, 0.05)
    assert job.hyperparameters.per_device_batch == 1
    assert job.hyperparameters.eval_every == 50
    assert job.training.gradient_checkpointing is True
    assert job.compute.sharding == "shard_grad_op"  # ZeRO-2
    assert job.algorithm.variety == "lora" and job.training.mode is None
    moved = {c.key for c in job.resolved_settings}
    assert {"lora.r", "lora.alpha", "lora.dropout", "lora.target_modules"} <= moved
    assert {"hyperparameters.eval_every", "compute.sharding", "algorithm.variety"} <= moved
    ignored = "\n".join(job.ignored_keys)
    for key in (
        "training.mode",
        "hyperparameters.parallelism.use_deepspeed",
        "hyperparameters.parallelism.bf16",
        "hyperparameters.parallelism.metric_for_best_model",
        "data.topology",
        "tags",
    ):
        assert f"{key} = " in ignored, key
    assert all("(" in line for line in job.ignored_keys)  # each with its reason


def test_hosted_keys_that_contradict_vlmtune_keys_are_refused(tmp_path):
    text = HOSTED_2B.replace('train_kind = "peft"', 'train_kind = "fft"')
    text = text.replace("[lora]", "") + "\n[lora]\nr = 32\n"
    (tmp_path / "job.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_job(tmp_path / "job.toml")
    assert "hyperparameters.train_kind: 'fft' contradicts algorithm.variety = 'lora'" in str(
        e.value
    )
    assert "hyperparameters.lora_rank: 8 contradicts lora.r = 32" in str(e.value)


def test_qlora_sharded_with_fsdp_is_refused(tmp_path):
    path = tiny_copy(tmp_path)
    with pytest.raises(ConfigError, match='sharding = "replicate"'):
        load_job(path, ["compute.sharding=full_shard"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA refusal")
def test_qlora_plans_on_the_cpu_and_train_refuses_in_one_line(tmp_path):
    path = tiny_copy(tmp_path)
    plan = runner.invoke(app, ["plan", "--config", str(path)])
    assert plan.exit_code == 0, plan.output
    assert "algorithm.variety: 'lora' -> 'qlora'" in plan.output
    assert "data-parallel over 2" in plan.output
    assert "* qlora" in plan.output
    dry = runner.invoke(app, ["train", "--config", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "torch.distributed.run --nproc-per-node 2" in dry.output
    assert "on this machine, training would stop here: algorithm.variety: qlora" in dry.output
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--config", str(path), "--nproc", "2", "-o", str(out)])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "qlora needs a CUDA GPU" in lines[0], res.output
    assert not out.exists()  # refused before any data work


def test_config_paths_that_are_not_job_files_are_one_clear_error(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    for path, message in ((tmp_path, "is a folder"), (binary, "not a text file")):
        res = runner.invoke(app, ["train", "--config", str(path)])
        assert res.exit_code == 2 and message in res.output, res.output
        assert "Traceback" not in res.output


def test_an_override_through_a_value_is_a_problem_not_a_crash(tmp_path):
    path = tiny_copy(tmp_path)
    with pytest.raises(ConfigError, match="job.model is a value"):
        load_job(path, ["job.model.revision=main"])


@pytest.mark.slow
def test_the_hosted_file_trains_on_two_cpu_processes_without_qlora(tmp_path):
    path = tiny_copy(tmp_path, use_qlora=False)
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        ["train", "--config", str(path), "--nproc", "2", "-o", str(out)]
        + ["hyperparameters.max_steps=1", "hyperparameters.gradient_accumulation_steps=4"],
    )
    assert res.exit_code == 0, res.output
    assert (out / "final" / "adapter_config.json").is_file()
