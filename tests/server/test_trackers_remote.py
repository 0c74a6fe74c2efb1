"""[logging] report_to in a TOML job run by `vlmtune serve`: the tracker runs in the
job's worker, beside the metrics.jsonl it mirrors, and writes in the job's folder."""

from __future__ import annotations

from pathlib import Path

from tests.recipes.test_trackers import assert_same, jsonl_points, tensorboard_points
from tests.server.test_jobs import job_file
from vlmtune.cli.serve import submit_job


def test_a_server_job_logs_to_tensorboard_in_its_run_directory(server, key, tmp_path, capsys):
    overrides = ["hyperparameters.max_steps=1", 'logging.report_to=["tensorboard"]']
    code = submit_job(job_file(tmp_path), "sft", server.url, key, overrides, poll=True)
    _, err = capsys.readouterr()
    assert code == 0, err
    job = max(server.context.jobs.list("toml"), key=lambda j: j["created"])
    run_dir = Path(job["run_dir"])
    points, _ = tensorboard_points(run_dir / "tensorboard")
    assert ("loss", 1) in points
    assert_same(points, jsonl_points(run_dir))


def test_a_server_job_may_not_write_tracker_files_elsewhere(server, key, tmp_path, capsys):
    overrides = ['logging.report_to=["tensorboard"]', f'logging.log_dir="{tmp_path / "tb"}"']
    code = submit_job(job_file(tmp_path), "sft", server.url, key, overrides, poll=True)
    _, err = capsys.readouterr()
    assert code != 0
    assert "logging.log_dir" in err and "outside the job's folder" in err, err
    assert not (tmp_path / "tb").exists()
