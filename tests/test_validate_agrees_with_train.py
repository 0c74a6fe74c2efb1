"""`vlmtune data validate --config` and a training run drop the same rows, for every reason.

One dataset per method holds a row of every drop kind (parse-time and render-time) and
rows whose extra images are dropped; the run's ``validation_report.json`` (the training
data's part) must equal what ``validate --config --json`` prints, line for line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import png_data_url
from vlmtune.cli import app
from vlmtune.config import load_job
from vlmtune.recipes import dpo, rl, sft

runner = CliRunner()
SEQUENCE_LENGTH = 96
NO_CAP = "max_images_per_message = 0"


def _img(width: int = 32, height: int = 32) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": png_data_url(width, height)}}


def _user(*parts: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"role": "user", "content": content}


def _assistant(text: str, weight: float | None = None) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **({} if weight is None else {"weight": weight})}


BROKEN_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
SYSTEM_WITH_IMAGE = {"role": "system", "content": [_img(), {"type": "text", "text": "Be brief."}]}
LONG = "nine " * 200


def sft_rows() -> list[Any]:
    """(row, what happens to it): the line number is the position + 1."""
    return [
        {"messages": [_user(_img(), "digit?"), _assistant("7")]},  # 1 kept
        "{not json",  # 2 parse: not valid JSON
        {"conversation": []},  # 3 parse: missing messages
        {"messages": [_user(BROKEN_IMAGE, "digit?"), _assistant("7")]},  # 4 parse: bad image
        {"messages": [_user(_img(4000, 10), "wide"), _assistant("7")]},  # 5 render: aspect ratio
        {"messages": [_user("look <|image_pad|> here"), _assistant("ok")]},  # 6 render: control
        {"messages": [_user(_img(), "long"), _assistant(LONG)]},  # 7 render: too long
        {"messages": [_user(_img(), _img(), "two"), _assistant("2")]},  # 8 kept, 1 image cut
        {"messages": [_user("hi"), _assistant("x", weight=0)]},  # 9 render: no trained tokens
        {"messages": [SYSTEM_WITH_IMAGE, _user(_img(), "q"), _assistant("3")]},  # 10 kept
    ]


def preference_rows() -> list[Any]:
    def pair(prompt: dict[str, Any], chosen: str, rejected: str, **kw: Any) -> dict[str, Any]:
        rejected_turn = _assistant(rejected, kw.get("rejected_weight"))
        return {
            "chosen": {"messages": [prompt, _assistant(chosen)]},
            "rejected": {"messages": [prompt, rejected_turn]},
        }

    return [
        pair(_user(_img(), "digit?"), "7", "1"),  # 1 kept
        "[1, 2",  # 2 parse: not valid JSON
        {"chosen": {"messages": [_user("q"), _assistant("a")]}},  # 3 parse: no rejected
        pair(_user(BROKEN_IMAGE, "digit?"), "7", "1"),  # 4 parse: bad image
        pair(_user(_img(4000, 10), "wide"), "7", "1"),  # 5 render: aspect ratio
        pair(_user(_img(), "q"), "7", "a <|im_end|> b"),  # 6 render: control token (rejected)
        pair(_user(_img(), "q"), LONG, "1"),  # 7 render: too long
        pair(_user(_img(), _img(), "two"), "2", "1"),  # 8 kept, 1 image cut
        pair(_user("q"), "7", "1", rejected_weight=0),  # 9 render: no response tokens
        {  # 10 parse: the prompts differ
            "chosen": {"messages": [_user("q1"), _assistant("a")]},
            "rejected": {"messages": [_user("q2"), _assistant("b")]},
        },
    ]


def rl_rows() -> list[Any]:
    def prompt(*parts: Any) -> dict[str, Any]:
        return {"messages": [_user(*parts)], "metadata": {"answer": "7"}}

    return [
        prompt(_img(), "digit?"),  # 1 kept
        "nope",  # 2 parse: not valid JSON
        {"metadata": {"answer": "7"}},  # 3 parse: missing messages
        prompt(BROKEN_IMAGE, "digit?"),  # 4 parse: bad image
        prompt(_img(4000, 10), "wide"),  # 5 render: aspect ratio
        prompt("say <|vision_start|> now"),  # 6 render: control token
        prompt(_img(), LONG),  # 7 render: prompt + max_tokens too long
        prompt(_img(), _img(), "two"),  # 8 kept, 1 image cut
        {"messages": [_user("q"), _assistant("a")]},  # 9 parse: ends with an assistant turn
        {"messages": [SYSTEM_WITH_IMAGE, _user(_img(), "q")]},  # 10 kept
    ]


CASES = {
    "sft": (sft_rows, sft.run, [2, 3, 4, 5, 6, 7, 9]),
    "dpo": (preference_rows, dpo.run, [2, 3, 4, 5, 6, 7, 9, 10]),
    "rl": (rl_rows, rl.run, [2, 3, 4, 5, 6, 7, 9]),
}


def write_job(tmp_path: Path, method: str, rows: list[Any], model_extra: str = "") -> Path:
    with (tmp_path / "data.jsonl").open("w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    toml = tmp_path / "job.toml"
    toml.write_text(
        f"""
[algorithm]
method = "{method}"
type = "{"online" if method == "rl" else "offline"}"
[job]
model = "tiny-qwen3-vl"
data = "data.jsonl"
[hyperparameters]
max_steps = 1
sequence_length = {SEQUENCE_LENGTH}
[lora]
r = 2
[training]
device = "cpu"
[model]
min_pixels = 4096
max_pixels = 4096
{model_extra}
[rl]
group_size = 2
prompts_per_step = 1
max_tokens = 4
"""
    )
    return toml


def validate_json(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["data", "validate", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def train_report(toml: Path, run_dir: Path, recipe: Any) -> dict[str, Any]:
    recipe(load_job(toml), run_dir, log=lambda *args, **kwargs: None)
    return json.loads((run_dir / "validation_report.json").read_text())["train"]


@pytest.mark.parametrize("method", ["sft", "dpo", "rl"])
def test_validate_config_drops_exactly_the_rows_training_drops(tmp_path, method):
    make_rows, recipe, dropped_lines = CASES[method]
    toml = write_job(tmp_path, method, make_rows())
    validated = validate_json("--config", str(toml))
    trained = train_report(toml, tmp_path / "run", recipe)

    assert validated == trained
    assert [d["line"] for d in trained["dropped"]] == dropped_lines
    assert trained["valid"] == 10 - len(dropped_lines)
    reasons = {d["line"]: d["reason"] for d in trained["dropped"]}
    # The render-time drops really are render-time: the parser alone keeps these rows.
    assert "aspect ratio" in reasons[5]
    assert "control token" in reasons[6]
    assert "sequence_length" in reasons[7]
    parse_only = validate_json(str(tmp_path / "data.jsonl"), "--kind", trained["kind"])
    assert {5, 6, 7}.isdisjoint(d["line"] for d in parse_only["dropped"])
    # The family's cap (Qwen3-VL: 1) applies although the job sets none: line 8 keeps
    # its row and loses one image; a system turn's image is left out by the template.
    capped = [w for w in trained["warnings"] if "over the cap of 1" in w["message"]]
    assert [w["line"] for w in capped] == [8] * (2 if method == "dpo" else 1)
    system_images = 1 if method in ("sft", "rl") else 0
    assert trained["images_dropped"] == 1 + system_images


@pytest.mark.parametrize("method", ["sft", "dpo", "rl"])
def test_no_cap_keeps_every_image_in_training_and_validation(tmp_path, method):
    make_rows, recipe, _ = CASES[method]
    two_images = make_rows()[7]  # line 8: two images in one user message
    toml = write_job(tmp_path, method, [two_images, make_rows()[0]], model_extra=NO_CAP)
    trained = train_report(toml, tmp_path / "run", recipe)
    assert validate_json("--config", str(toml)) == trained
    assert (trained["valid"], trained["images"], trained["images_dropped"]) == (2, 3, 0)
    assert trained["warnings"] == []


def test_validate_config_argument_errors_exit_2(tmp_path):
    toml = write_job(tmp_path, "sft", sft_rows())
    clash = runner.invoke(app, ["data", "validate", "--config", str(toml), "--kind", "rl"])
    assert clash.exit_code == 2 and "--kind: --config takes these from the job file" in clash.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(
        toml.read_text().replace(
            "max_pixels = 4096", "max_pixels = 4096\nmax_images_per_message = -1"
        )
    )
    result = runner.invoke(app, ["data", "validate", "--config", str(bad)])
    assert result.exit_code == 2 and "model.max_images_per_message" in result.stderr
    missing = tmp_path / "missing.toml"
    missing.write_text(toml.read_text().replace('"tiny-qwen3-vl"', f'"{tmp_path / "no-model"}"'))
    result = runner.invoke(app, ["data", "validate", "--config", str(missing)])
    assert result.exit_code == 2 and "job.model" in result.stderr and "no-model" in result.stderr
    neither = runner.invoke(app, ["data", "validate"])
    assert neither.exit_code == 2 and "--config JOB.toml" in neither.stderr
