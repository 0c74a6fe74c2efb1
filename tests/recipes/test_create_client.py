"""From a job file to a client: ``EngineConfig.from_job`` field by field, precision
"auto" resolved where the engine runs, and the settings a remote run carries."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch

from vlmtune.config import load_job
from vlmtune.engine.engine import HOST_SETTINGS, RUN_SETTINGS, EngineConfig
from vlmtune.engine.placement import resolve_dtype
from vlmtune.protocol.errors import BadRequest
from vlmtune.recipes.common import create_training_client
from vlmtune.sdk.http_service import remote_settings
from vlmtune.server.run_config import CLIENT_ENGINE_KEYS, checked_setting

# Every key from_job reads, set away from its default.
JOB = """
[algorithm]
variety = "{variety}"
[job]
model = "tiny-qwen3-vl"
revision = "v1"
data = "train.jsonl"
[compute]
fsdp = true
sharding = "shard_grad_op"
reduce_dtype = "bf16"
cpu_offload = true
[training]
precision = "{precision}"
device = "cpu"
gradient_checkpointing = true
attention = "flash_attention_2"
image_cache_dir = "/tmp/pixels"
[hyperparameters]
per_device_batch = 3
packing = false
sequence_length = 512
seed = 7
[lora]
r = 8
alpha = 12
dropout = 0.05
target_modules = ["q_proj", "v_proj"]
[model]
min_pixels = 1024
max_pixels = 8192
max_images_per_message = 2
freeze_vision_tower = false
freeze_projector = false
freeze_embeddings = true
"""


def job_file(tmp_path: Path, variety: str = "lora", precision: str = "bf16", text: str = JOB):
    (tmp_path / "train.jsonl").write_text("")
    toml = tmp_path / "job.toml"
    toml.write_text(text.format(variety=variety, precision=precision))
    return load_job(toml)


def test_from_job_maps_every_engine_field(tmp_path):
    config = EngineConfig.from_job(job_file(tmp_path))
    want = {
        "base_model": "tiny-qwen3-vl",
        "revision": "v1",
        "mode": "lora",
        "lora_rank": 8,
        "lora_alpha": 12,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "freeze_vision_tower": False,
        "freeze_projector": False,
        "freeze_embeddings": True,
        "min_pixels": 1024,
        "max_pixels": 8192,
        "max_images_per_message": 2,
        "precision": "bf16",
        "device": "cpu",
        "micro_batch_size": 3,
        "packing": False,
        "max_row_tokens": 512,
        "gradient_checkpointing": True,
        "attention": "flash_attention_2",
        "image_cache_dir": "/tmp/pixels",
        "seed": 7,
        "fsdp": True,
        "fsdp_reshard_after_forward": False,  # shard_grad_op keeps layers gathered
        "fsdp_reduce_dtype": "bf16",
        "fsdp_cpu_offload": True,
        "replicate": False,
    }
    # A new EngineConfig field must be mapped (or consciously defaulted) here.
    assert {f.name for f in fields(EngineConfig)} == set(want)
    for name, value in want.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize(("variety", "mode"), [("fft", "full"), ("qlora", "qlora")])
def test_from_job_mode_follows_the_variety(tmp_path, variety, mode):
    assert EngineConfig.from_job(job_file(tmp_path, variety=variety)).mode == mode


def test_replicate_sharding(tmp_path):
    job = job_file(tmp_path, text=JOB.replace('"shard_grad_op"', '"replicate"'))
    assert EngineConfig.from_job(job).replicate is True


@pytest.mark.parametrize(
    ("precision", "engine"),
    [("auto", "auto"), ("fp16", "auto"), ("bf16", "bf16"), ("fp32", "fp32")],
)
def test_precision_auto_is_left_to_the_engine(tmp_path, precision, engine):
    # "auto" used to become fp32 unless the CLI had resolved it first
    assert EngineConfig.from_job(job_file(tmp_path, precision=precision)).precision == engine


def test_auto_precision_is_bf16_only_on_a_gpu_that_has_it():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype("auto", cuda, bf16_supported=True) == torch.bfloat16
    assert resolve_dtype("auto", cuda, bf16_supported=False) == torch.float32
    assert resolve_dtype("auto", cpu, bf16_supported=True) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp32", cuda, bf16_supported=True) == torch.float32


def test_a_job_from_python_trains_in_the_devices_precision(tmp_path):
    """``create_training_client`` (what ``sft.run`` calls) with precision "auto": bf16 on
    a bf16 GPU, fp32 on this CPU, without the CLI's vision defaults."""
    job = job_file(tmp_path, precision="auto", text=SMALL_JOB)
    tc = create_training_client(job, tmp_path / "run")
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert tc.get_info()["dtype"] == ("bfloat16" if bf16 else "float32")


SMALL_JOB = """
[algorithm]
variety = "{variety}"
[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"
[training]
precision = "{precision}"
[lora]
r = 4
"""


def test_settings_split_into_the_runs_and_the_hosts():
    names = {f.name for f in fields(EngineConfig)}
    run, host = set(RUN_SETTINGS), set(HOST_SETTINGS)
    assert not run & host and run | host | {"base_model", "mode", "lora_rank"} == names
    assert set(CLIENT_ENGINE_KEYS) == run  # the server accepts what the SDK sends


def test_a_remote_run_carries_every_run_setting(tmp_path):
    job = job_file(tmp_path, text=JOB.replace("fsdp = true", "").replace("cpu_offload = true", ""))
    job.compute.sharding = "full_shard"
    job.compute.reduce_dtype = "fp32"
    config = EngineConfig.from_job(job)
    rank, settings = remote_settings(config)
    assert rank == 8 and settings == {k: getattr(config, k) for k in RUN_SETTINGS}
    assert "device" not in settings and "image_cache_dir" not in settings  # the server's
    for key, value in settings.items():  # and the server takes every one of them
        assert checked_setting(key, value) == value
    config.mode = "full"
    assert remote_settings(config)[0] == 0


def test_what_a_server_cannot_honour_is_refused(tmp_path):
    config = EngineConfig.from_job(job_file(tmp_path))  # fsdp, cpu offload, shard_grad_op
    with pytest.raises(ValueError, match="fsdp=True, fsdp_reshard_after_forward=False"):
        remote_settings(config)
    with pytest.raises(ValueError, match="QLoRA"):
        remote_settings(EngineConfig(base_model="tiny-qwen3-vl", mode="qlora"))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("precision", "fp16", "engine.precision: expected Literal['auto', 'bf16', 'fp32']"),
        ("micro_batch_size", "2", "engine.micro_batch_size: expected int, got '2'"),
        ("micro_batch_size", 0, "expected an integer >= 1"),
        ("packing", 1, "engine.packing: expected bool"),
        ("min_pixels", "big", "engine.min_pixels: expected int | None"),
    ],
)
def test_the_server_checks_each_setting_against_its_type(key, value, message):
    with pytest.raises(BadRequest) as err:
        checked_setting(key, value)
    assert message in str(err.value)
    assert checked_setting("lora_dropout", 0) == 0.0  # an int is a fine float
