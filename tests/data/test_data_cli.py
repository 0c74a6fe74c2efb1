"""`vlmtune data validate` / `inline`: output shapes and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmtune.cli import app

runner = CliRunner()
KEYS = ["path", "kind", "total", "valid", "images", "images_dropped", "dropped", "warnings"]


def _run(*args):
    return runner.invoke(app, ["data", *map(str, args)])


@pytest.fixture
def dataset(mk, tmp_path):
    two_images = {
        "messages": [mk.user(mk.img(mk.png_url()), mk.img(mk.png_url()), "q"), mk.assistant()]
    }
    return mk.write(tmp_path / "d.jsonl", [mk.sft(), "broken", two_images])


def test_validate_json_prints_one_object_and_exits_0_with_drops(dataset):
    result = _run("validate", dataset, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report) == KEYS
    assert (report["total"], report["valid"], report["images"]) == (3, 2, 2)
    assert report["images_dropped"] == 1
    assert report["dropped"] == [
        {"line": 2, "reason": "not valid JSON: Expecting value (column 1)"}
    ]
    assert report["warnings"][0]["line"] == 3  # default cap: 1 image per message


def test_validate_summary_and_strict(mk, dataset, tmp_path):
    result = _run("validate", dataset)
    assert result.exit_code == 0
    assert "dropped: 1" in result.stdout and "not valid JSON  (line 2)" in result.stdout
    assert _run("validate", dataset, "--strict").exit_code == 1
    clean = mk.write(tmp_path / "clean.jsonl", [mk.sft()])
    assert _run("validate", clean, "--strict", "--json").exit_code == 0


def test_validate_argument_errors_exit_2(dataset, tmp_path):
    missing = _run("validate", tmp_path / "missing.jsonl")
    assert missing.exit_code == 2 and "no such file" in missing.stderr and missing.stdout == ""
    assert _run("validate", tmp_path).exit_code == 2
    assert _run("validate", dataset, "--kind", "dpo").exit_code == 2
    assert _run("validate", dataset, "--max-images-per-message", "-1").exit_code == 2
    assert _run("validate", dataset, "--image-root", tmp_path / "nope").exit_code == 2


def test_model_sets_the_image_cap_and_the_flag_overrides_it(dataset):
    def warnings(*args):
        result = _run("validate", dataset, "--json", *args)
        assert result.exit_code == 0, result.output
        return len(json.loads(result.stdout)["warnings"])

    # The registry's family cap (1); the flag overrides it, 0 meaning no cap.
    assert warnings("--model", "tiny-qwen3-vl") == 1
    assert warnings("--model", "tiny-qwen3-vl", "--max-images-per-message", "2") == 0
    assert warnings("--model", "tiny-qwen3-vl", "--max-images-per-message", "0") == 0
    assert warnings("--max-images-per-message", "0") == 0
    unknown = _run("validate", dataset, "--model", "gpt-2")
    assert unknown.exit_code == 2 and "--model 'gpt-2': unknown model" in unknown.stderr


def test_model_renders_every_row_with_its_tokenizer(mk, tmp_path):
    control = {"messages": [mk.user("say <|im_end|> now"), mk.assistant()]}
    path = mk.write(tmp_path / "c.jsonl", [mk.sft(), control])
    parse_only = json.loads(_run("validate", path, "--json").stdout)
    assert parse_only["valid"] == 2
    rendered = json.loads(_run("validate", path, "--json", "--model", "tiny-qwen3-vl").stdout)
    assert rendered["valid"] == 1 and rendered["images"] == 1
    assert rendered["dropped"] == [
        {"line": 2, "reason": "messages[0] (user): text contains the control token <|im_end|>"}
    ]


def test_validate_kind_and_image_root(mk, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(mk.png())
    (tmp_path / "ds").mkdir()
    path = mk.write(
        tmp_path / "ds" / "rl.jsonl", [{"messages": [mk.user(mk.img("../imgs/a.png"), "q")]}]
    )
    refused = json.loads(_run("validate", path, "--kind", "rl", "--json").stdout)
    assert (
        refused["valid"] == 0 and "outside the dataset directory" in refused["dropped"][0]["reason"]
    )
    allowed = json.loads(
        _run("validate", path, "--kind", "rl", "--json", "--image-root", tmp_path).stdout
    )
    assert allowed["valid"] == 1 and allowed["kind"] == "rl"


def test_inline_cli(mk, tmp_path, image_server):
    image_server.routes["/a.png"] = image_server.Route(
        body=mk.png(), headers={"Content-Type": "image/png"}
    )
    src = mk.write(tmp_path / "in.jsonl", [mk.sft(image_server.url("/a.png")), mk.sft()])
    out = tmp_path / "out.jsonl"
    refused = _run("inline", src, out, "--json")
    assert refused.exit_code == 0
    data = json.loads(refused.stdout)
    assert (data["written"], data["images"]) == (1, 0) and "loopback" in data["failed"][0]["reason"]
    assert _run("inline", src, out, "--strict").exit_code == 1
    allowed = _run("inline", src, out, "--allow-private-network", "--strict")
    assert allowed.exit_code == 0, allowed.output
    assert "written: 2" in allowed.stdout and "images inlined: 1" in allowed.stdout
    assert json.loads(_run("validate", out, "--json").stdout)["valid"] == 2
    assert _run("inline", tmp_path / "nope.jsonl", out).exit_code == 2
    assert _run("inline", src, tmp_path / "no" / "dir.jsonl").exit_code == 2


def test_installed_command_keeps_stdout_pure_json(dataset):
    exe = Path(sys.executable).parent / "vlmtune"
    if not exe.exists():
        pytest.skip("vlmtune console script not installed")
    proc = subprocess.run(
        [exe, "data", "validate", dataset, "--json"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)) == KEYS
    missing = subprocess.run(
        [exe, "data", "validate", "/nonexistent.jsonl"], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
