"""TOML jobs: submitted, run in a worker process, promoted, served; the CLI around them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from tests.conftest import png_data_url
from tests.recipes.test_sft import write_rows
from tests.server.test_job_progress import assert_events_are_the_metrics
from tests.tiny_job import tiny_job
from vlmtune.cli import app
from vlmtune.cli.serve import submit_job
from vlmtune.sdk.jobs import JobsClient

runner = CliRunner()
JOB = tiny_job(
    job='name = "Digits SFT"',
    hyperparameters="n_epochs = 1\nlearning_rate = 5e-3\nsave_every = 1",
)


def job_file(tmp_path: Path) -> Path:
    write_rows(tmp_path / "train.jsonl", 4)
    (tmp_path / "job.toml").write_text(JOB)
    return tmp_path / "job.toml"


def test_toml_job_runs_promotes_and_serves_chat(server, key, api, tmp_path, capsys):
    config = job_file(tmp_path)
    code = submit_job(config, "sft", server.url, key, ["hyperparameters.max_steps=1"], poll=True)
    out, err = capsys.readouterr()
    assert code == 0, err
    model_id = out.strip().splitlines()[-1]
    assert model_id.startswith("digits-sft")
    assert "[progress] step 1/1  loss" in err and "[promoted]" in err
    (job,) = [j for j in server.context.jobs.list("toml") if j["model_id"] == model_id]
    # The CLI prints the job's report page, which opens without a key (a signed link).
    (url,) = [line[8:] for line in err.splitlines() if line.startswith("report: ")]
    assert url.startswith(f"{server.url}/v1/jobs/{job['id']}/report?token=")
    page = httpx.get(url, timeout=60)
    assert page.status_code == 200 and ">succeeded<" in page.text and "1 of 1" in page.text
    events = JobsClient(server.url, key).events(job["id"])["events"]
    (progress,) = assert_events_are_the_metrics(events, Path(job["run_dir"]))
    assert progress["data"]["total"] == 1 and "grad_norm" in progress["data"]["metrics"]

    assert model_id in [m["id"] for m in api.get("/v1/models").json()["data"]]
    message = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(32, 32, seed=1)}},
        {"type": "text", "text": "What digit is this?"}]}  # fmt: skip
    r = api.post(
        "/v1/chat/completions", json={"model": model_id, "messages": [message], "max_tokens": 4}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and isinstance(
        body["choices"][0]["message"]["content"], str
    )
    assert body["usage"]["prompt_tokens"] > 4

    with api.stream("POST", "/v1/chat/completions", json={"model": model_id, "messages": [message],
                                                          "max_tokens": 3, "stream": True}) as s:  # fmt: skip
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"

    bad = [
        (
            {
                "model": model_id,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}
                        ],
                    }
                ],
            },
            400,
        ),  # fmt: skip
        (
            {
                "model": model_id,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,AAAA"},
                            }
                        ],
                    }
                ],
            },
            400,
        ),  # fmt: skip
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ({"model": model_id, "messages": []}, 400),
    ]
    for request, status in bad:
        r = api.post("/v1/chat/completions", json=request)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]


def test_submit_without_poll_then_cancel_and_list(server, key, tmp_path, capsys):
    config = job_file(tmp_path)
    assert submit_job(config, "sft", server.url, key, [], poll=False) == 0
    out, err = capsys.readouterr()
    job_id = out.strip()  # stdout: the id alone, for scripts; the report's URL on stderr
    assert job_id.startswith("job-")
    assert f"report: {server.url}/v1/jobs/{job_id}/report?token=" in err
    opts = ["--server", server.url, "--api-key", key]
    reported = runner.invoke(app, ["jobs", "report", job_id, *opts])
    assert reported.output.startswith(f"{server.url}/v1/jobs/{job_id}/report?token=")
    result = runner.invoke(app, ["jobs", "cancel", job_id, *opts])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["state"] == "cancelled"
    listed = runner.invoke(app, ["jobs", "list", *opts])
    assert job_id in listed.output and "cancelled" in listed.output
    shown = runner.invoke(app, ["jobs", "show", job_id, "--events", *opts])
    assert "cancelled" in shown.output
    resumed = runner.invoke(app, ["jobs", "resume", job_id, *opts])
    assert json.loads(resumed.output)["state"] in ("queued", "running")
    runner.invoke(app, ["jobs", "cancel", job_id, *opts])
    deadline = time.monotonic() + 60
    while (
        httpx.get(f"{server.url}/v1/jobs/{job_id}", headers={"X-API-Key": key}).json()["state"]
        != "cancelled"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_submit_rejects_a_bad_config_before_sending(server, key, tmp_path, capsys):
    (tmp_path / "bad.toml").write_text(
        "[job]\nmodel = 'tiny-qwen3-vl'\n[hyperparameters]\nbogus = 1\n"
    )
    assert submit_job(tmp_path / "bad.toml", "sft", server.url, key, [], poll=True) == 2
    err = capsys.readouterr().err
    assert "job.data" in err and "hyperparameters.bogus" in err


def test_keys_create_prints_a_tinker_style_key_and_stores_only_a_hash(tmp_path):
    result = runner.invoke(app, ["keys", "create", "--data-dir", str(tmp_path), "--label", "ci"])
    assert result.exit_code == 0
    new_key = result.output.strip()
    assert new_key.startswith("tml-")
    db = (tmp_path / "server.db").read_bytes()
    assert new_key.encode() not in db and new_key.split("_", 1)[1].encode() not in db
    listed = runner.invoke(app, ["keys", "list", "--data-dir", str(tmp_path)])
    assert "ci" in listed.output and new_key not in listed.output
