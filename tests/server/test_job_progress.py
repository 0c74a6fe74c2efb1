"""TOML jobs report progress from the run's metrics.jsonl: the follower, and SFT/DPO/RL jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.recipes.test_dpo import write_pairs
from tests.recipes.test_rl import write_prompts
from vlmtune.cli.serve import submit_job
from vlmtune.sdk.jobs import JobsClient
from vlmtune.server.job_progress import MetricsTail, job_event


def line(record: dict) -> str:
    return json.dumps(record) + "\n"


def test_a_partial_last_line_waits_for_its_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read_new() == []  # the worker has not written it yet
    second = line({"step": 2, "loss": 0.5})
    path.write_text(line({"step": 1, "loss": 1.0}) + second[:7])
    assert tail.read_new() == [{"step": 1, "loss": 1.0}]
    assert tail.read_new() == []
    with path.open("a") as f:
        f.write(second[7:])
    assert tail.read_new() == [{"step": 2, "loss": 0.5}]


def test_a_resume_rewrite_reports_only_new_records(tmp_path):
    """--resume keeps the lines up to the checkpoint and appends: the kept ones were
    reported; the retrained step 3 is new, even though the file grew past the old end."""
    path = tmp_path / "metrics.jsonl"
    r1, r2, r3 = ({"step": s, "loss": 1.0 / s, "tokens_per_s": 10.0} for s in (1, 2, 3))
    path.write_text(line(r1) + line(r2) + line(r3))
    tail = MetricsTail(path)
    assert tail.read_new() == [r1, r2, r3]
    r3_again = {**r3, "tokens_per_s": 12.345678901234, "grad_norm": 0.123456789}
    path.write_text(line(r1) + line(r2) + line(r3_again))
    assert tail.read_new() == [r3_again]
    with path.open("a") as f:
        f.write(line({"step": 4, "loss": 0.2}))
    assert tail.read_new() == [{"step": 4, "loss": 0.2}]


def test_records_reported_by_an_earlier_attempt_are_not_repeated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(line({"step": 1, "loss": 1.0}) + "not json\n" + line({"step": 2, "loss": 0.5}))
    tail = MetricsTail(path, reported=[{"loss": 1.0, "step": 1}])  # key order does not matter
    assert tail.read_new() == [{"step": 2, "loss": 0.5}]


def test_job_event_types_messages_and_data():
    sft = {"step": 3, "total_steps": 10, "loss": 0.5, "grad_norm": 1.25}
    assert job_event(sft) == (
        "progress",
        "step 3/10  loss 0.5000",
        {"step": 3, "total": 10, "loss": 0.5, "metrics": sft},
    )
    rl = {"step": 1, "loss": 0.0, "reward_mean": 0.25}
    kind, message, data = job_event(rl)
    assert (kind, message) == ("progress", "step 1  loss 0.0000  reward_mean 0.2500")
    assert data["total"] is None and data["metrics"] == rl
    ev = {"step": 2, "eval/loss": 0.125, "eval/accuracy": 0.5, "eval/n": 2}
    assert job_event(ev) == (
        "eval",
        "eval @ step 2: loss 0.1250  accuracy 0.5000  n 2",
        {"step": 2, "loss": 0.125, "accuracy": 0.5, "metrics": ev},
    )


COMMON = """
[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"
validation_data = "val.jsonl"
[hyperparameters]
n_epochs = 2
learning_rate = 1e-3
sequence_length = 128
eval_max_new_tokens = 2
eval_max_examples = 1
[lora]
r = 4
[model]
min_pixels = 4096
max_pixels = 4096
"""


def dpo_job(tmp_path: Path) -> str:
    write_pairs(tmp_path / "train.jsonl", 2)
    write_pairs(tmp_path / "val.jsonl", 1)
    return '[algorithm]\nmethod = "dpo"\nvariety = "lora"\n' + COMMON


def rl_job(tmp_path: Path) -> str:
    write_prompts(tmp_path / "train.jsonl", [{"answer": "3"}, {"answer": "5"}])
    write_prompts(tmp_path / "val.jsonl", [{"answer": "3"}])
    return (
        '[algorithm]\ntype = "online"\nmethod = "rl"\nvariety = "lora"\n'
        + COMMON
        + "[rl]\ngroup_size = 2\nprompts_per_step = 2\nmax_tokens = 2\n"
    )


def assert_events_are_the_metrics(events: list[dict], run_dir: Path) -> list[dict]:
    """The progress and eval events carry the run's metrics.jsonl, record for record, all
    before the job says it succeeded; returns them."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reported = [e for e in events if e["type"] in ("progress", "eval")]
    canonical = [json.dumps(e["data"]["metrics"], sort_keys=True) for e in reported]
    assert canonical == [json.dumps(r, sort_keys=True) for r in records]  # NaN-safe
    kinds = ["eval" if any(k.startswith("eval/") for k in r) else "progress" for r in records]
    assert [e["type"] for e in reported] == kinds
    assert all(e["data"]["step"] == r["step"] for e, r in zip(reported, records, strict=True))
    succeeded = next(i for i, e in enumerate(events) if e["type"] == "succeeded")
    assert events.index(reported[-1]) < succeeded
    return reported


# The SFT job is test_jobs.py's: one worker start less.
@pytest.mark.parametrize("type_, make_job", [("dpo", dpo_job), ("rl", rl_job)])
def test_dpo_and_rl_jobs_report_their_metrics_jsonl(server, key, tmp_path, capsys, type_, make_job):
    # Two examples, pairs or prompts: one step an epoch, two epochs, then an eval.
    (tmp_path / "job.toml").write_text(make_job(tmp_path))
    assert submit_job(tmp_path / "job.toml", type_, server.url, key, [], poll=False) == 0
    job_id = capsys.readouterr().out.strip()
    client = JobsClient(server.url, key)
    events = [e for _, e in client.follow(job_id, poll_s=5.0) if e is not None]
    job = client.get(job_id)
    assert job["state"] == "succeeded", job["error"]

    reported = assert_events_are_the_metrics(
        events, Path(server.context.jobs.get(job_id)["run_dir"])
    )
    steps = [e for e in reported if e["type"] == "progress"]
    assert [e["data"]["step"] for e in steps] == [1, 2]
    assert all(e["data"]["total"] == 2 for e in steps)
    assert [e["message"].split("  ")[0] for e in steps] == ["step 1/2", "step 2/2"]
    headline = "reward_mean" if type_ == "rl" else "dpo_loss"
    assert all(headline in e["data"]["metrics"] for e in steps)
    assert all("reward_mean" in e["message"] for e in steps) == (type_ == "rl")
    evals = [e for e in reported if e["type"] == "eval"]
    assert evals and evals[-1]["data"]["step"] == 2 and "eval/n" in evals[-1]["data"]["metrics"]
