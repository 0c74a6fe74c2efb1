"""`vlmtune train --server URL --poll` and `vlmtune eval --server URL` from the command line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.server.test_jobs import job_file, write_rows
from vlmtune.cli import app

runner = CliRunner()


def test_train_poll_then_eval_against_the_server(server, key, tmp_path):
    config = job_file(tmp_path)
    res = runner.invoke(
        app,
        ["train", "--type", "sft", "--config", str(config), "--server", server.url, "--poll",
         "hyperparameters.max_steps=1", "job.name=cli-remote"],
        env={"VLMTUNE_API_KEY": key},
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    model_id = res.stdout.strip().splitlines()[-1]
    assert model_id.startswith("cli-remote")

    write_rows(tmp_path / "test.jsonl", 2)
    res = runner.invoke(
        app,
        ["eval", "--server", server.url, "--model", model_id, "--data", str(tmp_path / "test.jsonl"),
         "--json", "--max-new-tokens", "3"],
        env={"VLMTUNE_API_KEY": key},
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n"] == 2 and 0.0 <= out["accuracy"] <= 1.0


def test_train_with_a_wrong_key_fails_cleanly(server, tmp_path):
    config = job_file(tmp_path)
    res = runner.invoke(
        app, ["train", "--config", str(config), "--server", server.url, "--api-key", "tml-wrong"]
    )
    assert res.exit_code != 0
