"""Training shapes: the keys they own, config errors, the SDK reference, the CLI listings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmtune.cli import app
from vlmtune.cli.plan import fits, shape_estimate
from vlmtune.config import ConfigError, dump_toml, load_job
from vlmtune.planning.shapes import get_shape, gpu_memory_gib, list_shapes

runner = CliRunner()


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "train.jsonl").write_text("")
    path = tmp_path / "job.toml"
    path.write_text(body)
    return path


SHAPED = """
[algorithm]
variety = "lora"
[job]
data = "train.jsonl"
[compute]
shape = "qwen3-vl-8b-65k"
"""


def test_every_gpu_shape_fits_its_gpu_in_each_of_its_modes():
    names = [s.name for s in list_shapes()]
    assert len(names) == len(set(names)) and "qwen3-vl-8b-65k" in names
    for shape in list_shapes():
        if shape.gpu_type == "cpu":
            continue
        assert gpu_memory_gib(shape.gpu_type) is not None, shape.name
        for mode in shape.modes:
            assert fits(shape_estimate(shape, mode), shape.gpu_type), (shape.name, mode)


def test_the_issue_example_shape():
    shape = get_shape("qwen3-vl-8b-65k")
    assert (shape.model, shape.max_context, shape.gpu_count) == (
        "Qwen/Qwen3-VL-8B-Instruct",
        65_536,
        4,
    )


def test_a_shape_fills_the_keys_it_owns(tmp_path):
    job = load_job(write(tmp_path, SHAPED))
    assert job.job.model == "Qwen/Qwen3-VL-8B-Instruct"
    assert job.hyperparameters.sequence_length == 65_536
    assert (job.compute.gpu_type, job.compute.gpu_count, job.compute.nodes) == ("H100", 4, 1)
    assert job.training.precision == "bf16" and job.training.gradient_checkpointing
    assert job.compute.sharding == "full_shard"
    # The resolved config (written next to every run) loads again: owned keys are comments.
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(dump_toml(job))
    assert "# (from the shape) sequence_length = 65536" in resolved.read_text()
    assert load_job(resolved).hyperparameters.sequence_length == 65_536


def test_setting_an_owned_key_by_hand_is_an_error_naming_every_key(tmp_path):
    body = SHAPED.replace('data = "train.jsonl"', 'data = "train.jsonl"\nmodel = "qwen3-vl-8b"')
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, body), ["compute.gpu_count=8", "training.precision=fp32"])
    text = str(err.value)
    for key in ("job.model", "compute.gpu_count", "training.precision"):
        assert f"{key}: set by training shape 'qwen3-vl-8b-65k'" in text
    assert "3 problem(s)" in text


@pytest.mark.parametrize(
    ("compute", "message"),
    [
        ('shape = "nope"', "compute.shape: unknown training shape 'nope'"),
        ('shape = "tiny-2k-cpu2"\ntraining_shape_ref = "tiny-2k-cpu2"', "not both"),
    ],
)
def test_bad_shape_references(tmp_path, compute, message):
    body = '[job]\ndata = "train.jsonl"\n[compute]\n' + compute
    with pytest.raises(ConfigError, match=message):
        load_job(write(tmp_path, body))


def test_training_shape_ref_and_mode_check(tmp_path):
    body = '[algorithm]\nvariety = "fft"\n[job]\ndata = "train.jsonl"\n[compute]\n'
    job = load_job(write(tmp_path, body + 'training_shape_ref = "tiny-2k-cpu2"'))
    assert job.training.device == "cpu" and job.compute.gpu_count == 2
    with pytest.raises(ConfigError, match="algorithm.variety: 'fft' is not validated"):
        load_job(write(tmp_path, body + 'shape = "qwen3-vl-32b-32k"'))


def test_sdk_training_shape_ref_rejects_clashes_and_the_wrong_process_count():
    from vlmtune.sdk import ServiceClient

    with pytest.raises(ValueError, match="sets max_row_tokens"):
        ServiceClient().create_training_client(
            training_shape_ref="tiny-2k-cpu2", max_row_tokens=512
        )
    with pytest.raises(ValueError, match="runs on 2 processes"):
        ServiceClient().create_training_client(training_shape_ref="tiny-2k-cpu2")


def test_shapes_command_lists_every_shape_with_memory_per_gpu():
    result = runner.invoke(app, ["shapes"])
    assert result.exit_code == 0, result.output
    for shape in list_shapes():
        assert shape.name in result.output
    as_json = runner.invoke(app, ["shapes", "--json"])
    records = [json.loads(x) for x in as_json.output.splitlines()]
    assert len(records) == sum(len(s.modes) for s in list_shapes())
    r = next(x for x in records if x["shape"] == "qwen3-vl-8b-65k")
    parts = r["bytes_per_gpu"]
    assert parts["total"] == sum(
        parts[k] for k in ("weights", "grads", "optimizer", "activations", "overhead")
    )
    assert r["fits"] is True


def test_plan_command_prints_every_mode_with_and_without_checkpointing(tmp_path):
    body = '[algorithm]\nvariety = "lora"\n[job]\nmodel = "qwen3-vl-8b"\ndata = "train.jsonl"\n'
    body += '[compute]\ngpu_type = "H100"\n[hyperparameters]\nsequence_length = 8192\n'
    result = runner.invoke(app, ["plan", "--config", str(write(tmp_path, body))])
    assert result.exit_code == 0, result.output
    assert "8,767,009,536 parameters" in result.output
    starred = [x for x in result.output.splitlines() if x.startswith("*")]
    assert len(starred) == 1 and "lora" in starred[0] and " off " in starred[0]
    out = json.loads(
        runner.invoke(app, ["plan", "--config", str(tmp_path / "job.toml"), "--json"]).output
    )
    assert [(e["mode"], e["activation_checkpointing"]) for e in out["estimates"]] == [
        (m, ac) for m in ("full", "lora", "qlora") for ac in (False, True)
    ]
    assert sum(e["job"] for e in out["estimates"]) == 1
