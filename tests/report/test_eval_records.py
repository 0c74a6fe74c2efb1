"""What a run records for its report: each eval's predictions, small image copies, and
the settings it changed (``recipes/eval_records.py``)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from tests.conftest import assistant, image_part, user
from tests.test_hosted_job import HOSTED_2B
from vlmtune.config import load_job
from vlmtune.data.schema import Message, SFTRow, TextPart
from vlmtune.evaluation import EvalResult
from vlmtune.recipes.eval_records import (
    SETTINGS_FILE,
    THUMBNAIL_PX,
    prompt_text,
    write_applied_settings,
    write_eval_predictions,
)
from vlmtune.recipes.rl import reward_spread
from vlmtune.recipes.run_dir import RunDir
from vlmtune.settings import SettingChange


def row(line: int, *parts, answer: str = "7") -> SFTRow:
    return SFTRow(line, [user(*parts), assistant(answer)])


def test_predictions_are_written_with_their_prompt_and_small_image_copies(tmp_path):
    run = RunDir(tmp_path, main=True)
    rows = [row(4, image_part(32, 32, seed=1), TextPart("What digit?")),
            row(9, image_part(640, 480, seed=2), TextPart("And this one?"), answer="2")]  # fmt: skip
    result = EvalResult(0.5, 2, [
        {"line": 4, "prediction": "7", "answer": "7", "correct": True},
        {"line": 9, "prediction": "3", "answer": "2", "correct": False}])  # fmt: skip
    write_eval_predictions(run, 6, rows, result)
    records = [
        json.loads(x) for x in (tmp_path / "evals" / "step-6.jsonl").read_text().splitlines()
    ]
    assert records == [
        {"line": 4, "prompt": "What digit?", "images": ["evals/images/line-4-0.png"],
         "prediction": "7", "answer": "7", "correct": True},
        {"line": 9, "prompt": "And this one?", "images": ["evals/images/line-9-0.jpg"],
         "prediction": "3", "answer": "2", "correct": False},
    ]  # fmt: skip
    small = Image.open(tmp_path / "evals/images/line-4-0.png")
    assert small.size == (32, 32)  # small images are kept as they are, losslessly
    big = Image.open(io.BytesIO((tmp_path / "evals/images/line-9-0.jpg").read_bytes()))
    assert big.size == (THUMBNAIL_PX, THUMBNAIL_PX * 3 // 4)  # aspect kept

    # A later eval of the same rows reuses the copies.
    before = (tmp_path / "evals/images/line-9-0.jpg").stat().st_mtime_ns
    write_eval_predictions(run, 8, rows, result)
    assert (tmp_path / "evals/images/line-9-0.jpg").stat().st_mtime_ns == before
    assert sorted(p.name for p in (tmp_path / "evals").glob("*.jsonl")) == [
        "step-6.jsonl", "step-8.jsonl"]  # fmt: skip

    # RL records each answer's reward beside it.
    write_eval_predictions(run, 9, rows, result, rewards=[1.0, 0.25])
    rl = [json.loads(x) for x in (tmp_path / "evals" / "step-9.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rl] == [1.0, 0.25]

    # Other torchrun ranks write nothing.
    other = RunDir(tmp_path / "rank1", main=False)
    write_eval_predictions(other, 6, rows, result)
    assert list((tmp_path / "rank1").iterdir()) == []


def test_a_prompt_of_images_only_is_told_by_its_system_text():
    system = Message("system", [TextPart("Press the button of the lamp's colour.")])
    r = SFTRow(1, [system, user(image_part()), assistant("red")])
    assert prompt_text(r) == "Press the button of the lamp's colour."
    assert prompt_text(row(1, image_part())) == ""


def test_the_applied_settings_name_key_old_new_and_why(tmp_path):
    run = RunDir(tmp_path / "run", main=True)
    (tmp_path / "job.toml").write_text(HOSTED_2B)  # the hosted trainer's keys: resolved
    job = load_job(tmp_path / "job.toml")
    change = SettingChange("training.precision", "auto", "fp32", "no bf16 on this cpu: fp32")
    write_applied_settings(run, job, "sft", [change])
    written = json.loads((tmp_path / "run" / SETTINGS_FILE).read_text())
    assert written["method"] == "sft"
    assert written["vision_defaults"] == [{"key": "training.precision", "old": "auto",
                                           "new": "fp32", "reason": "no bf16 on this cpu: fp32"}]  # fmt: skip
    moved = {c["key"]: (c["old"], c["new"]) for c in written["job_file"]}
    assert moved["lora.r"][1] == 8 and "compute.sharding" in moved
    assert written["ignored_keys"] == job.ignored_keys and written["ignored_keys"]


def test_an_rl_step_records_its_reward_spread_as_rewards_some_sample_got():
    assert reward_spread([1.0, 0.0, 0.0, 1.0, 1.0]) == {
        "reward_min": 0.0, "reward_p25": 0.0, "reward_median": 1.0, "reward_p75": 1.0,
        "reward_max": 1.0}  # fmt: skip
    spread = reward_spread([0.1 * i for i in range(11)])
    assert (spread["reward_p25"], spread["reward_median"]) == pytest.approx((0.2, 0.5))
    assert reward_spread([0.5]) == dict.fromkeys(spread, 0.5)
