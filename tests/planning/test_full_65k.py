"""The hosted guide's full-parameter job on qwen3-vl-8b-65k: planned to fit 4 x 80 GB with
the settings it needs, and a plan that does not fit names the term and the shortfall."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmtune.cli import app
from vlmtune.config import load_job
from vlmtune.planning.activations import (
    HEAD_CHUNK_LOGITS_BUDGET,
    PATCHES_PER_IMAGE_TOKEN,
    lm_head_bytes,
)
from vlmtune.planning.fit import fits, shortfall, usable_bytes
from vlmtune.planning.memory import GIB, dims_for, estimate_memory
from vlmtune.planning.shapes import get_shape

runner = CliRunner()
GUIDE_JOB = Path(__file__).parents[2] / "examples" / "hosted" / "vlm_guide_full_65k.toml"
DIMS = dims_for("qwen3-vl-8b")

# The guide's job without the shape: 4 GPUs, 65k rows, checkpointing, no CPU offload.
UNSHAPED = """
[algorithm]
variety = "fft"
[job]
model = "qwen3-vl-8b"
data = "train.jsonl"
[compute]
gpu_type = "H100"
gpu_count = {gpus}
[training]
gradient_checkpointing = {ckpt}
[hyperparameters]
sequence_length = 65536
"""


def plan(*args: str) -> str:
    result = runner.invoke(app, ["plan", *args])
    assert result.exit_code == 0, result.output
    return result.output


def unshaped(tmp_path: Path, gpus: int = 4, ckpt: bool = True) -> Path:
    (tmp_path / "train.jsonl").write_text("")
    path = tmp_path / "job.toml"
    path.write_text(UNSHAPED.format(gpus=gpus, ckpt=str(ckpt).lower()))
    return path


def test_the_shape_admits_full_fine_tuning_with_cpu_offload_and_lora_without():
    shape = get_shape("accounts/fireworks/trainingShapes/qwen3-vl-8b-65k/versions/v1")
    assert shape.name == "qwen3-vl-8b-65k" and set(shape.modes) == {"full", "lora"}
    full, lora = shape.for_mode("full"), shape.for_mode("lora")
    assert full.cpu_offload and full.activation_checkpointing
    assert (full.gpu_count, full.sharding, full.max_context) == (4, "full_shard", 65_536)
    assert not lora.cpu_offload
    assert full.engine_settings()["fsdp_cpu_offload"] is True
    assert lora.engine_settings()["fsdp_cpu_offload"] is False


def test_the_guide_job_loads_with_the_full_mode_settings():
    job = load_job(GUIDE_JOB)
    assert job.finetune_mode == "full" and job.job.model == "Qwen/Qwen3-VL-8B-Instruct"
    assert job.compute.cpu_offload and job.training.gradient_checkpointing
    assert (job.compute.gpu_count, job.hyperparameters.sequence_length) == (4, 65_536)
    lora = load_job(GUIDE_JOB, ["algorithm.variety=lora"])
    assert not lora.compute.cpu_offload


def test_the_guide_job_plans_as_fitting_4x80gb_and_prints_its_settings():
    out = plan("--config", str(GUIDE_JOB))
    starred = [x for x in out.splitlines() if x.startswith("*")]
    assert len(starred) == 1 and " full " in starred[0] and " on " in starred[0]
    assert "yes" in starred[0] and "GiB host" in starred[0]
    for needed in (
        "FSDP2 over 4 (full_shard)",
        "activation checkpointing: on",
        "no T x T mask",
        "chunked log-softmax",
        "CPU offload: on",
        "this job fits H100",
        "decoder layer inputs kept (36 x 65,536 tokens)",
        "one decoder layer recomputed in backward",
    ):
        assert needed in out, needed
    assert "does not fit" not in out
    data = json.loads(plan("--config", str(GUIDE_JOB), "--json"))
    own = next(e for e in data["estimates"] if e["job"])
    assert own["fits"] is True and own["mode"] == "full"
    per_gpu = own["bytes_per_gpu"]
    assert per_gpu["total"] <= usable_bytes("A100-80GB")  # any 80 GB GPU
    assert per_gpu["optimizer"] == 0 and per_gpu["host"] > 0
    assert data["does_not_fit"] == [] and data["remedies"] == []


def test_without_cpu_offload_the_plan_says_how_much_is_over_and_what_fits(tmp_path):
    est = estimate_memory(
        DIMS, mode="full", context=65_536, world_size=4, activation_checkpointing=True,
        image_tokens=65_536,
    )  # fmt: skip
    over = (est.total - usable_bytes("H100")) / GIB
    assert not fits(est, "H100") and 5 < over < 10  # ~7.7 GiB over on paper
    out = plan("--config", str(unshaped(tmp_path)))
    assert f"this job does not fit: {est.total / GIB:.1f} GiB per GPU" in out
    assert f"over by {over:.1f} GiB" in out
    # Every term is named with its size; the optimizer's are fp32 AdamW moments over 4.
    assert f"optimizer {est.optimizer / GIB:.1f} GiB (AdamW moments of 8.19B trainable / 4" in out
    assert "weights 11.5 GiB (fp32 shards (1/4) 8.2" in out
    offload = [x for x in out.splitlines() if "with CPU offload on" in x]
    assert len(offload) == 1 and "(fits" in offload[0]


def test_two_gpus_without_offload_do_not_fit_and_need_more_than_checkpointing(tmp_path):
    out = plan("--config", str(unshaped(tmp_path, gpus=2)))
    assert "this job does not fit" in out and "the largest term is activations" in out
    assert "optimizer 30.5 GiB" in out  # AdamW's fp32 moments over 2 GPUs, not 4
    assert any("with CPU offload on" in x and "(fits" in x for x in out.splitlines())


def test_without_checkpointing_the_plan_names_the_kept_layer_activations(tmp_path):
    out = plan("--config", str(unshaped(tmp_path, ckpt=False)), "compute.cpu_offload=true")
    assert "the largest term is activations" in out
    assert "decoder layer activations kept (36 x 65,536 tokens) 598.5" in out
    line = next(x for x in out.splitlines() if "with activation checkpointing on" in x)
    assert "(fits" in line


def test_a_frozen_tower_does_not_raise_the_peak_and_a_trainable_one_does():
    kw = dict(mode="full", context=65_536, world_size=4, activation_checkpointing=True)
    text = estimate_memory(DIMS, **kw)
    images = estimate_memory(DIMS, image_tokens=65_536, **kw)
    # The frozen tower runs without autograd, before the language model holds anything.
    assert images.activations == text.activations
    assert images.activation_phase == "language model backward"
    trainable = estimate_memory(DIMS, image_tokens=65_536, freeze_vision=False, **kw)
    kept = dict(trainable.term_parts("activations"))[
        "vision tower activations kept for its backward"
    ]
    # 27 block inputs of 1152 bf16 values for 4 patches per image token, plus the mergers.
    patches = PATCHES_PER_IMAGE_TOKEN * 65_536
    assert kept > 27 * 2 * 1152 * patches
    assert trainable.activations == text.activations + kept
    few = estimate_memory(DIMS, image_tokens=1024, freeze_vision=False, **kw)
    assert few.activations < trainable.activations


def test_no_checkpointing_peaks_at_the_end_of_forward_with_the_vision_features():
    kw = dict(mode="lora", context=8192, world_size=4)
    est = estimate_memory(DIMS, image_tokens=8192, **kw)
    assert est.activation_phase == "language model forward"
    parts = dict(est.term_parts("activations"))
    assert parts["vision features read by the language model (8,192 image tokens)"] == (
        DIMS.vision_mergers * 2 * DIMS.hidden * 8192
    )


def test_the_lm_head_is_counted_as_the_engine_runs_it():
    # Frozen or trainable: one fp32 (chunk, V) block, the bf16 logits it is cast from,
    # and the (N, H) gradient.
    chunk = HEAD_CHUNK_LOGITS_BUDGET // DIMS.vocab
    expected = (4 + 2) * chunk * DIMS.vocab + 2 * DIMS.hidden * 1000
    assert lm_head_bytes(DIMS, 2, 1000) == expected


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
@pytest.mark.parametrize("offload", [False, True])
def test_the_parts_add_up_to_each_term(mode, offload):
    est = estimate_memory(
        DIMS, mode=mode, context=32_768, world_size=4, cpu_offload=offload,
        activation_checkpointing=True, image_tokens=4096,
    )  # fmt: skip
    for term in ("weights", "grads", "optimizer", "activations"):
        assert sum(b for _, b in est.term_parts(term)) == getattr(est, term), term
    assert shortfall(est, "H100") == [] or not fits(est, "H100")
