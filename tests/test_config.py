"""Every config error is refused before any work, all listed at once with TOML keys."""

from pathlib import Path

import pytest

from vlmtune.config import ConfigError, load_job
from vlmtune.defaults import apply_vision_defaults

GOOD = """
[algorithm]
type = "offline"
method = "sft"
variety = "lora"

[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"

[hyperparameters]
per_device_batch = 4
gradient_accumulation_steps = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def problems(tmp_path: Path, text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_job(write(tmp_path, text), **kw)
    return e.value.problems


def test_good_config_resolves_paths_relative_to_the_toml(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    assert job.job.data == str((tmp_path / "train.jsonl").resolve())
    assert job.finetune_mode == "lora"


def test_unknown_keys_wrong_types_and_missing_all_listed_at_once(tmp_path):
    text = (
        GOOD.replace('model = "tiny-qwen3-vl"\n', "")
        + """
learning_rate = "fast"
bogus = 1
[lora]
r = 0
[nonsense]
x = 1
"""
    )
    found = problems(tmp_path, text)
    joined = "\n".join(found)
    assert "job.model: required key is missing" in joined
    assert "hyperparameters.learning_rate:" in joined
    assert "hyperparameters.bogus: unknown key" in joined
    assert "lora.r:" in joined
    assert "nonsense: unknown key" in joined
    assert len(found) == 5


def test_contradictions_are_refused(tmp_path):
    text = (
        GOOD
        + """
[training]
mode = "full"
use_qlora = true
[model]
min_pixels = 10000
max_pixels = 100
"""
    )
    found = "\n".join(problems(tmp_path, text, method="dpo"))
    assert "training.mode: 'full' contradicts algorithm.variety = 'lora'" in found
    assert "training.use_qlora" in found
    assert "algorithm.method: 'sft' but the command asks for --type dpo" in found
    assert "model.min_pixels" in found


def test_wrong_enum_and_range(tmp_path):
    text = GOOD.replace('variety = "lora"', 'variety = "adapter"') + "warmup_ratio = 1.5\n"
    found = "\n".join(problems(tmp_path, text))
    assert "algorithm.variety:" in found
    assert "hyperparameters.warmup_ratio:" in found


def test_invalid_toml_and_missing_file(tmp_path):
    assert "not valid TOML" in problems(tmp_path, "[job\nmodel=")[0]
    with pytest.raises(ConfigError, match="file not found"):
        load_job(tmp_path / "absent.toml")


def test_overrides_are_typed_and_validated(tmp_path):
    job = load_job(write(tmp_path, GOOD), ["hyperparameters.learning_rate=3e-4", "job.name=abc"])
    assert job.hyperparameters.learning_rate == 3e-4 and job.job.name == "abc"
    found = problems(tmp_path, GOOD, overrides=["hyperparameters.n_epochs=-1", "nokey"])
    assert any("not key=value" in p for p in found)
    assert any("hyperparameters.n_epochs" in p for p in found)


def test_vision_defaults_are_applied_and_reported(tmp_path):
    job = load_job(write(tmp_path, GOOD + '[training]\nprecision = "fp16"\n'))
    changes = {
        c.key: c
        for c in apply_vision_defaults(job, supports_vision=True, device_type="cpu", bf16_ok=False)
    }
    assert changes["hyperparameters.per_device_batch"].new == 1
    assert changes["hyperparameters.per_device_batch"].old == 4
    assert changes["hyperparameters.gradient_accumulation_steps"].new == 8  # keeps 4 * 2
    assert changes["training.precision"].new == "fp32"
    assert job.hyperparameters.per_device_batch == 1
    gpu = load_job(write(tmp_path, GOOD))
    gpu_changes = {
        c.key: c
        for c in apply_vision_defaults(gpu, supports_vision=True, device_type="cuda", bf16_ok=True)
    }
    assert gpu_changes["training.precision"].new == "bf16"
    text_only = load_job(write(tmp_path, GOOD))
    assert (
        apply_vision_defaults(text_only, supports_vision=False, device_type="cpu", bf16_ok=False)
        == []
    )


def test_relative_model_directory_resolves_from_the_toml_folder(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    (jobs / "ckpt" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # not the TOML's folder

    def model(name: str):
        return load_job(write_in(jobs, GOOD.replace('"tiny-qwen3-vl"', f'"{name}"'))).job

    assert model("ckpt/final").model == str((jobs / "ckpt" / "final").resolve())
    assert model("./ckpt").model == str((jobs / "ckpt").resolve())
    # "./" is a path even when missing, so the error names the directory tried.
    assert model("./missing").model == str((jobs / "missing").resolve())
    # Hub ids, registry and hosted names stay as written.
    for name in ("Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl-8b", "tiny-qwen3-vl",
                 "accounts/fireworks/models/qwen3-vl-8b-instruct"):  # fmt: skip
        assert model(name).model == name


def test_revision_is_a_documented_job_key(tmp_path):
    from vlmtune.config import JobConfig, dump_toml

    job = load_job(write(tmp_path, GOOD), ['job.revision="v1.0"'])
    assert job.job.revision == "v1.0"
    assert 'revision = "v1.0"' in dump_toml(job)
    assert JobConfig.model_fields["revision"].description
    assert load_job(write(tmp_path, GOOD)).job.revision is None


def write_in(folder: Path, text: str) -> Path:
    p = folder / "job.toml"
    p.write_text(text)
    return p
