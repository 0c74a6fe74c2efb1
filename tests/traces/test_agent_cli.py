"""`vlmtune collect` and `vlmtune filter` end to end on the lamp task, and their refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlmtune.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_collect_random_filter_successes_and_validate(tmp_path):
    store = tmp_path / "traces.db"
    result = _run("collect", "--task", "lamp", "--policy", "random", "--episodes", 40,
                  "--concurrency", 4, "--store", store, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["episodes"], summary["errors"], summary["steps"]) == (40, 0, 40)
    assert 0.05 <= summary["success_rate"] <= 0.6  # about 1 in 4
    assert summary["valid_action_share"] == 1.0

    out, val = tmp_path / "sft.jsonl", tmp_path / "val.jsonl"
    result = _run("filter", "--store", store, "--to", "sft", "--output", out, "--success-only",
                  "--validation-output", val, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    successes = round(summary["success_rate"] * 40)
    assert report["train_rows"] + report["validation_rows"] == successes
    assert report["episodes_dropped"] == {"not a success (--success-only)": 40 - successes}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["messages"][-1]["content"] == r["metadata"]["expert_action"] for r in rows)

    for path in (out, val):
        checked = _run("data", "validate", path, "--strict", "--json")
        assert checked.exit_code == 0, checked.output
        assert json.loads(checked.stdout)["valid"] == len(path.read_text().splitlines())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["collect", "--task", "nope", "--policy", "random"], "unknown task 'nope'"),
        (["collect", "--task", "lamp", "--policy", "no/such-model"], "not a model here"),
        (["collect", "--task", "lamp", "--policy", "openai:http://x"], "needs --model"),
        (["collect", "--task", "lamp", "--policy", "random", "--split", "dev"], "--split 'dev'"),
        (["filter", "--to", "sft", "--output", "o.jsonl"], "no such file"),
    ],
)
def test_bad_input_is_one_clear_error_and_exit_2(tmp_path, args, message):
    result = _run(*args, "--store", tmp_path / "missing.db")
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_filter_refuses_a_file_that_is_not_a_store(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_text("hello" * 1000)
    result = _run("filter", "--store", junk, "--to", "sft", "--output", tmp_path / "o.jsonl")
    assert result.exit_code == 2 and "junk.db" in result.stderr
