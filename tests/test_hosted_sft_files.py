"""Every SFT job file of the hosted trainer's CLI (synth-ai 0.2.24), pasted unchanged.

``tests/fixtures/hosted_sft/`` holds them verbatim. Their keys are used (moved to
vlmtune's schema, old -> new) or ignored with a reason; a value vlmtune cannot honour,
and a model it does not fine-tune, are refused by name; the hosted CLI's job-create
body is read with the same tables.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.recipes.test_sft import write_rows
from tests.test_hosted_job import HOSTED_2B, REPO
from vlmtune.cli import app
from vlmtune.config import ConfigError, JobFile, load_job

runner = CliRunner()

FIXTURES = REPO / "tests" / "fixtures" / "hosted_sft"
QWEN3_VL_FILES = {
    "blog_pokemon_vl_train_sft_qwen4b_vl.toml",
    "qwen_vl_sft_qwen3_vl_2b_test.toml",
    "qwen_vl_crafter_vlm_sft_example.toml",
}
OTHER_MODEL_FILES = sorted(p.name for p in FIXTURES.glob("*.toml") if p.name not in QWEN3_VL_FILES)
PARALLELISM = "hyperparameters.parallelism"
BEST_MODEL = ("save_best_model_at_end", "metric_for_best_model", "greater_is_better")


def _leaves(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every key of a TOML document, dotted, down to its values."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{dotted}.")
        else:
            out[dotted] = value
    return out


def _reported(job: JobFile, key: str) -> bool:
    """Whether the load's report names ``key`` (used: moved or changed; or ignored)."""
    ignored = any(
        line.startswith(f"{key} = ") or key.startswith(line.split(" = ")[0] + ".")
        for line in job.ignored_keys
    )
    used = any(c.key == key or f"from {key}" in c.reason for c in job.resolved_settings)
    short = key.rsplit(".", 1)[-1]  # train_kind, named as the reason's source
    return ignored or used or any(f"from {short} " in c.reason for c in job.resolved_settings)


@pytest.mark.parametrize(
    ("name", "expected", "ignored"),
    [
        (
            "blog_pokemon_vl_train_sft_qwen4b_vl.toml",
            ("Qwen/Qwen3-VL-4B-Instruct", "fft", 2, 2, 64, 8e-6, 4096, 0, None, "full_shard", 4),
            ["hyperparameters.world_size", "job.poll_seconds", "data.topology"]
            + [f"{PARALLELISM}.{k}" for k in ("use_deepspeed", "fsdp", "bf16", "fp16")],
        ),
        (
            "qwen_vl_sft_qwen3_vl_2b_test.toml",
            ("Qwen/Qwen3-VL-2B-Instruct", "lora", 2, 1, 4, 5e-5, 2048, 0, None, "full_shard", 1),
            ["training.validation.enabled", "model_config.supports_vision"]
            + ["model_config.max_model_len", "tags"]
            + [f"{PARALLELISM}.{k}" for k in ("use_deepspeed", "fsdp", "bf16", "fp16")],
        ),
        (
            "qwen_vl_crafter_vlm_sft_example.toml",
            ("Qwen/Qwen3-VL-8B-Instruct", "qlora", 2, 1, 32, 5e-6, 2048, 100, None, "replicate", 2),
            # ZeRO-2 under QLoRA: 4-bit weights train data-parallel, so the stage is ignored
            [f"{PARALLELISM}.deepspeed_stage", f"{PARALLELISM}.evaluation_strategy", "tags"]
            + [f"{PARALLELISM}.{k}" for k in (*BEST_MODEL, "load_best_model_at_end")],
        ),
    ],
)
def test_the_hosted_qwen3_vl_sft_files_load_as_they_are(name, expected, ignored):
    job = load_job(FIXTURES / name, method="sft")
    hp = job.hyperparameters
    assert job.algorithm.method == "sft"
    assert (
        job.job.model, job.algorithm.variety, hp.n_epochs, hp.per_device_batch,
        hp.gradient_accumulation_steps, hp.learning_rate, hp.sequence_length, hp.eval_every,
        job.job.validation_data, job.compute.sharding, job.compute.gpu_count,
    ) == expected  # fmt: skip
    ignored_lines = "\n".join(job.ignored_keys)
    for key in ignored:
        assert f"{key} = " in ignored_lines, key
    assert all(line.endswith(")") and " is ignored (" in line for line in job.ignored_keys)


def test_the_hosted_files_lora_and_vision_keys_mean_what_they_say():
    job = load_job(FIXTURES / "qwen_vl_sft_qwen3_vl_2b_test.toml")
    assert (job.lora.r, job.lora.alpha, job.lora.dropout) == (16, 32, 0.05)
    # LLaVA's "mm_projector" names no Qwen3-VL module: dropped with a reason, not silently
    assert "mm_projector" not in job.lora.target_modules
    assert job.lora.target_modules[:2] == ["q_proj", "v_proj"]
    assert job.model.max_images_per_message == 1  # from [model_config]
    assert job.training.gradient_checkpointing is False
    dropped = [c for c in job.resolved_settings if c.key == "lora.target_modules"][-1]
    assert "'mm_projector' (LLaVA's projector) names no Qwen3-VL module" in dropped.reason
    full = load_job(FIXTURES / "blog_pokemon_vl_train_sft_qwen4b_vl.toml")
    assert full.finetune_mode == "full" and full.training.mode == "full"  # "full_finetune"


@pytest.mark.parametrize("name", sorted(FIXTURES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_key_of_every_hosted_sft_file_is_used_or_ignored_with_a_reason(name):
    # The model and data given on the command line (the text-only files need a model
    # vlmtune serves, some files name no data): every other key is the file's own.
    source = tomllib.loads(name.read_text())
    job = load_job(name, ["job.model=tiny-qwen3-vl", "job.data=train.jsonl"], method="sft")
    schema = {f"{s}.{k}" for s, m in JobFile.model_fields.items()
              for k in m.annotation.model_fields}  # type: ignore[union-attr]  # fmt: skip
    dumped = _leaves(job.model_dump())
    for key, value in _leaves(source).items():
        if key in ("job.model", "job.data"):
            continue
        if value == ["all-linear"]:  # the schema's spelling of the same choice
            value = "all-linear"
        kept_as_is = key in schema and dumped.get(key) == value
        assert kept_as_is or _reported(job, key), f"{name.name}: {key} = {value!r} unreported"


@pytest.mark.parametrize("name", OTHER_MODEL_FILES)
def test_files_for_models_vlmtune_does_not_serve_are_one_clear_refusal(name):
    with pytest.raises(ConfigError) as e:
        load_job(FIXTURES / name)
    assert len(e.value.problems) == 1, e.value.problems  # not a list of key errors
    (problem,) = e.value.problems
    model = tomllib.loads((FIXTURES / name).read_text())["job"]["model"]
    kind = "an API model" if model.startswith("openai/") else "a text-only Qwen3 model"
    assert problem.startswith(f"job.model: {model!r} is {kind}")
    assert "; vlmtune fine-tunes Qwen3-VL only (" in problem
    assert "Qwen/Qwen3-VL-8B-Instruct" in problem and "qwen3-vl-8b" in problem


def test_an_unserved_model_is_one_line_from_the_cli():
    res = runner.invoke(app, ["train", "--config", str(FIXTURES / "qwen_coder_coder_lora_4b.toml")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "job.model: 'Qwen/Qwen3-4B' is a text-only Qwen3 model" in lines[0]


def test_a_missing_dataset_says_how_to_give_it(tmp_path):
    # The hosted CLI takes the data with --dataset; here it is an override.
    name = FIXTURES / "dev_qwen3_32b_qlora_4xh100.toml"  # [job] has no data
    res = runner.invoke(app, ["train", "--config", str(name), "job.model=qwen3-vl-8b"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert (
        "job.data: required key is missing; name the training JSONL (the hosted CLI's "
        in res.output
    )
    assert "vlmtune train --config FILE job.data=PATH" in res.output
    job = load_job(name, ["job.model=qwen3-vl-8b", f"job.data={tmp_path / 'train.jsonl'}"])
    assert job.job.data == str(tmp_path / "train.jsonl")


def test_qlora_with_deepspeed_stage_2_is_qlora_data_parallel(tmp_path):
    # Once refused: ZeRO-2 set FSDP2 sharding before use_qlora made the job QLoRA.
    (tmp_path / "job.toml").write_text(HOSTED_2B.replace("use_qlora = false", "use_qlora = true"))
    job = load_job(tmp_path / "job.toml")
    assert (job.algorithm.variety, job.compute.sharding) == ("qlora", "replicate")
    ignored = "\n".join(job.ignored_keys)
    assert "hyperparameters.parallelism.deepspeed_stage = 2 is ignored (4-bit weights" in ignored
    one_gpu = HOSTED_2B.replace("use_qlora = false", "use_qlora = true").replace(
        "gpu_count = 2", "gpu_count = 1"
    )
    (tmp_path / "job.toml").write_text(one_gpu)
    assert load_job(tmp_path / "job.toml").compute.sharding == "full_shard"  # one process


BASE = '[job]\nmodel = "tiny-qwen3-vl"\ndata = "train.jsonl"\n[compute]\ngpu_count = 2\n'


@pytest.mark.parametrize(
    ("extra", "setting", "value"),
    [
        ("[hyperparameters]\nglobal_batch = 16\nper_device_batch = 2",
         "hyperparameters.gradient_accumulation_steps", 4),
        ("[hyperparameters]\ntotal_steps = 7", "hyperparameters.max_steps", 7),
        ("[hyperparameters]\nsteps = 7", "hyperparameters.max_steps", 7),
        ("[hyperparameters.parallelism]\nfp16 = true\nbf16 = false", "training.precision", "fp16"),
        ("[hyperparameters.parallelism]\nbf16 = false\nfp16 = false", "training.precision", "fp32"),
        ("[hyperparameters.parallelism]\nbf16 = true", "training.precision", "auto"),
        ('[algorithm]\nmethod = "supervised_finetune"', "algorithm.method", "sft"),
        ('[training]\nmode = "full_finetune"', "algorithm.variety", "fft"),
        ('[data]\nvalidation_path = "val.jsonl"\n[training.validation]\nenabled = false',
         "job.validation_data", None),
        ('[data]\nvalidation_path = "val.jsonl"\n[training.validation]\neval_steps = 5',
         "hyperparameters.eval_every", 5),
        ('[training.lora]\nr = 4\nalpha = 8', "lora.r", 4),
        ('type = "sft"', "algorithm.method", "sft"),
    ],
)  # fmt: skip
def test_hosted_keys_become_vlmtune_settings(tmp_path, extra, setting, value):
    # a top-level key comes before the first table
    text = BASE + extra + "\n" if extra.startswith("[") else extra + "\n" + BASE
    (tmp_path / "job.toml").write_text(text)
    job = load_job(tmp_path / "job.toml")
    section, key = setting.split(".")
    assert getattr(getattr(job, section), key) == value


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("[hyperparameters]\nglobal_batch = 15", "hyperparameters.global_batch: 15 is not a multiple of per_device_batch 1 x 2 processes"),
        ("[hyperparameters]\nglobal_batch = 16\ngradient_accumulation_steps = 4", "hyperparameters.global_batch: 16 is not per_device_batch 1 x 2 processes x gradient_accumulation_steps 4"),
        ("[hyperparameters]\nworld_size = 8", "hyperparameters.world_size: 8 processes, but compute.gpu_count x compute.nodes = 2"),
        ("[hyperparameters.parallelism]\nbf16 = true\nfp16 = true", "hyperparameters.parallelism.fp16: true contradicts bf16 = true"),
        ("[hyperparameters.parallelism]\nzero_offload = true", "hyperparameters.parallelism.zero_offload: unknown key (of [hyperparameters.parallelism], vlmtune reads"),
        ("[hyperparameters.parallelism]\ndeepspeed_stage = 4", "hyperparameters.parallelism.deepspeed_stage: 4 is not a DeepSpeed ZeRO stage"),
        ('[training.validation]\nenabled = "yes"', "training.validation.enabled: must be true or false"),
        ('[model_config]\nmax_pixels = 5', "model_config.max_pixels: unknown key"),
    ],
)  # fmt: skip
def test_hosted_keys_vlmtune_cannot_honour_are_refused_by_name(tmp_path, extra, problem):
    (tmp_path / "job.toml").write_text(BASE + extra + "\n")
    with pytest.raises(ConfigError) as e:
        load_job(tmp_path / "job.toml")
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_a_top_level_type_that_contradicts_the_method_is_refused(tmp_path):
    (tmp_path / "job.toml").write_text('type = "rl"\n' + BASE)
    with pytest.raises(ConfigError, match="type: 'rl' contradicts algorithm.method = 'sft'"):
        load_job(tmp_path / "job.toml")


def _body_job(tmp_path: Path, body: dict[str, Any], model: str) -> JobFile:
    """The hosted CLI's job-create body, loaded as `POST /api/learning/jobs` loads it."""
    from vlmtune.server import synth_config

    raw, _ = synth_config.hosted_job(body, model, "job")
    (tmp_path / "job.toml").write_text(synth_config.toml_text(raw))
    try:
        return load_job(tmp_path / "job.toml", method="sft")
    except ConfigError as e:
        raise synth_config.body_problems(e) from None


def test_the_hosted_clis_body_is_read_with_the_same_tables(tmp_path):
    body = {
        "model": "Qwen/Qwen3-VL-4B-Instruct",
        "training_file_id": "file-1",
        "validation_file": "file-2",
        "hyperparameters": {"n_epochs": 1, "global_batch": 64, "per_device_batch": 2,
                            "total_steps": 9, "parallelism": {"fp16": True}},
        "metadata": {"effective_config": {
            "compute": {"gpu_count": 4},
            "training": {"mode": "full_finetune", "validation": {"enabled": False}},
        }},
    }  # fmt: skip
    job = _body_job(tmp_path, body, "tiny-qwen3-vl")
    hp = job.hyperparameters
    assert (hp.gradient_accumulation_steps, hp.max_steps) == (8, 9)  # 64 / (2 x 4 GPUs)
    assert (job.algorithm.variety, job.training.precision) == ("fft", "fp16")
    assert job.job.validation_data is None  # validation.enabled = false


def test_the_hosted_clis_body_for_a_text_model_is_refused_by_its_name(tmp_path):
    body = {"model": "Qwen/Qwen3-4B", "training_file_id": "file-1"}
    with pytest.raises(ConfigError) as e:
        _body_job(tmp_path, body | {"hyperparameters": {"n_epochs": 1}}, "Qwen/Qwen3-4B")
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(
        "model (job.model): 'Qwen/Qwen3-4B' is a text-only Qwen3 model"
    )


@pytest.mark.slow
def test_a_hosted_qwen3_vl_file_trains_with_only_model_and_data_given(tmp_path):
    write_rows(tmp_path / "train.jsonl", 8)
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        ["train", "--config", str(FIXTURES / "qwen_vl_sft_qwen3_vl_2b_test.toml"), "-o", str(out)]
        + ["job.model=tiny-qwen3-vl", f"job.data={tmp_path / 'train.jsonl'}"]
        + ["hyperparameters.max_steps=1"],
    )
    assert res.exit_code == 0, res.output
    assert "job file: hyperparameters.parallelism.use_deepspeed = False is ignored (" in res.output
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32  # the file's lora_rank, lora_alpha
