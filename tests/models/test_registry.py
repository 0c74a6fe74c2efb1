from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from vlmtune.cli.models import register
from vlmtune.models.registry import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    TINY_SPEC,
    UnknownModelError,
    get_model_spec,
    list_models,
    spec_from_dir,
)

EXPECTED = [
    "Qwen/Qwen3-VL-2B-Instruct",
    "Qwen/Qwen3-VL-4B-Instruct",
    "Qwen/Qwen3-VL-8B-Instruct",
    "Qwen/Qwen3-VL-32B-Instruct",
    "Qwen/Qwen3-VL-30B-A3B-Instruct",
    "Qwen/Qwen3-VL-235B-A22B-Instruct",
    "tiny-qwen3-vl",
    "tiny-qwen3-vl-moe",
]


def test_list_models_has_every_sku() -> None:
    assert [s.name for s in list_models()] == EXPECTED


@pytest.mark.parametrize(
    "key",
    [
        "Qwen/Qwen3-VL-8B-Instruct",
        "qwen/qwen3-vl-8b-instruct",
        "qwen3-vl-8b",
        "Qwen3-VL-8B-Instruct",
    ],
)
def test_lookup_exact_case_insensitive_and_alias(key: str) -> None:
    assert get_model_spec(key).name == "Qwen/Qwen3-VL-8B-Instruct"


def test_moe_specs() -> None:
    moe = get_model_spec("qwen3-vl-30b-a3b")
    assert moe.is_moe and moe.active_params < moe.params
    assert not get_model_spec("qwen3-vl-8b").is_moe


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(KeyError) as e:
        get_model_spec("Qwen/Qwen9-VL-1T")
    assert isinstance(e.value, UnknownModelError)
    for name in EXPECTED:
        assert name in str(e.value)


def test_235b_needs_several_gpus() -> None:
    spec = get_model_spec("Qwen/Qwen3-VL-235B-A22B-Instruct")
    assert spec.min_gpus > 1
    msg = spec.check_fits(1)
    assert msg is not None
    assert f"Qwen/Qwen3-VL-235B-A22B-Instruct needs at least {spec.min_gpus} GPUs" in msg
    assert spec.check_fits(spec.min_gpus) is None
    assert get_model_spec("qwen3-vl-8b").check_fits(1) is None
    assert TINY_SPEC.check_fits(0) is None


def test_vision_defaults() -> None:
    spec = get_model_spec("qwen3-vl-2b")
    assert (spec.min_pixels, spec.max_pixels) == (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    assert spec.max_images_per_message == 1 and spec.supports_vision
    assert DEFAULT_MIN_PIXELS % (32 * 32) == 0 and DEFAULT_MAX_PIXELS % (32 * 32) == 0


def test_spec_from_tiny_dir(tiny_dir: Path) -> None:
    assert get_model_spec(str(tiny_dir)) == TINY_SPEC


def test_spec_derived_from_plain_dir(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "finetuned"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "processor_config.json"):
        shutil.copy(tiny_dir / name, d / name)
    spec = get_model_spec(str(d))
    assert spec.name == str(d)
    assert spec.params == TINY_SPEC.params  # counted from the safetensors header
    assert (spec.min_pixels, spec.max_pixels) == (TINY_SPEC.min_pixels, TINY_SPEC.max_pixels)
    assert spec.hidden_size == 128 and not spec.is_moe


def test_spec_from_hf_cache_snapshot_path(tmp_path: Path) -> None:
    snap = tmp_path / "models--Qwen--Qwen3-VL-4B-Instruct" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    assert spec_from_dir(snap).name == "Qwen/Qwen3-VL-4B-Instruct"


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(KeyError, match="llama"):
        get_model_spec(str(tmp_path))


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")  # a second command so typer keeps "models" as a subcommand
    def _noop() -> None:
        pass

    return app


def test_cli_models_json() -> None:
    result = CliRunner().invoke(_app(), ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == EXPECTED
    assert rows[-1]["min_gpus"] == 0


def test_cli_models_table() -> None:
    result = CliRunner().invoke(_app(), ["models"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "Qwen/Qwen3-VL-235B-A22B-Instruct" in result.output
    assert "tiny-qwen3-vl" in result.output
