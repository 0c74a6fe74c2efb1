"""The SFT, DPO and RL recipes, unchanged, against ``vlmtune serve``: their first three
steps' losses equal the in-process runs' (rel 1e-5), and a remote run resumes from the
state the server kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.recipes.test_dpo import write_pairs
from tests.recipes.test_rl import REWARD_FILE, write_prompts
from tests.recipes.test_sft import write_rows
from tests.tiny_job import tiny_job
from vlmtune.config import JobFile, load_job
from vlmtune.recipes import dpo, rl, sft
from vlmtune.recipes.common import latest_checkpoint
from vlmtune.sdk import connect

STEPS = 3
JOBS = {
    # The recipes apply the vision defaults (gradient_accumulation_steps 2 -> 8): all 6
    # examples a step, packed, 3 epochs; a checkpoint after step 2 (for the resume test)
    "sft": tiny_job(
        algorithm='method = "sft"',
        hyperparameters=f"max_steps = {STEPS}\nlearning_rate = 5e-3\nn_epochs = 3\n"
        "gradient_accumulation_steps = 2\nsave_every = 2",
        extra="",
    ),
    # all 4 pairs a step (vision defaults, as for SFT) through forward_backward_custom;
    # reference log-probs by forward
    "dpo": tiny_job(
        algorithm='method = "dpo"',
        hyperparameters=f"max_steps = {STEPS}\nlearning_rate = 5e-4\nn_epochs = 3\n"
        "gradient_accumulation_steps = 2",
        extra="[dpo]\nbeta = 0.5",
    ),
    # ppo with a KL term: forward_reference and forward_backward_custom. One prompt a
    # step: over HTTP each prompt is its own sampling request, and a seeded draw equals
    # the in-process one only when the batch holds that prompt's group alone.
    "rl": tiny_job(
        algorithm='type = "online"\nmethod = "rl"',
        hyperparameters=f"max_steps = {STEPS}\nlearning_rate = 5e-3\nn_epochs = 2",
        extra='[rl]\nreward = "digits.py:alternating"\ngroup_size = 4\nprompts_per_step = 1\n'
        'max_tokens = 3\nloss = "ppo"\nkl_coef = 0.1',
    ),
}


def job_for(method: str, folder: Path) -> JobFile:
    folder.mkdir(parents=True, exist_ok=True)
    if method == "sft":
        write_rows(folder / "train.jsonl", 6)
    elif method == "dpo":
        write_pairs(folder / "train.jsonl", 4)
    else:
        write_prompts(folder / "train.jsonl", [{}, {}])
        (folder / "digits.py").write_text(REWARD_FILE)  # rewards 0, 1, 0, 1, ... per run
    (folder / "job.toml").write_text(JOBS[method])
    return load_job(folder / "job.toml", method=method)


def run_recipe(method: str, folder: Path, run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    job = job_for(method, folder)  # a fresh job each run: RL rewrites its reward spec
    recipe = {"sft": sft.run, "dpo": dpo.run, "rl": rl.run}[method]
    if method == "rl":
        kwargs["config_dir"] = folder
    return recipe(job, run_dir, **kwargs)


def steps(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in steps(run_dir)]


@pytest.mark.parametrize("method", ["sft", "dpo", "rl"])
def test_recipe_over_http_equals_in_process(method, server, key, tmp_path):
    logs: list[str] = []
    local = run_recipe(method, tmp_path / "local", tmp_path / "local" / "run", log=logs.append)
    service = connect(server.url, api_key=key)
    remote = run_recipe(
        method, tmp_path / "remote", tmp_path / "remote" / "run", log=logs.append, service=service
    )
    want, got = step_losses(tmp_path / "local" / "run"), step_losses(tmp_path / "remote" / "run")
    assert len(want) == len(got) == STEPS
    assert any(loss != 0 for loss in want), want  # something trained
    # abs: RL's first, on-policy step has a loss of 0 up to float noise (group-centred
    # advantages on completions of one length, importance ratios of 1)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (got, want)
    if method == "rl":  # the same samples, rewards and trained tokens
        for key in ("reward_mean", "trained_tokens", "completion_len_mean"):
            assert [r[key] for r in steps(tmp_path / "remote" / "run")] == [
                r[key] for r in steps(tmp_path / "local" / "run")
            ], key
    # The servable model: a folder here, a path the server serves there.
    assert (Path(local["final_dir"]) / "adapter_config.json").exists()
    assert remote["final_dir"].startswith("tinker://") and remote["final_dir"].endswith(
        "/sampler_weights/final"
    )
    assert any(f"on {server.url}" in line for line in logs)  # describe() names the server


def test_a_remote_run_resumes_from_the_state_the_server_kept(server, key, tmp_path):
    service = connect(server.url, api_key=key)
    run_dir = tmp_path / "run"
    run_recipe("sft", tmp_path / "job", run_dir, log=lambda *_: None, service=service)
    pointer = run_dir / "checkpoints" / "step-2.remote"
    assert pointer.read_text().strip().endswith("/weights/step-2")
    assert latest_checkpoint(run_dir) == pointer.read_text().strip()
    first = step_losses(run_dir)

    # Interrupted after step 2: only the pointer and the metrics so far are left here.
    again = tmp_path / "again"
    shutil.copytree(run_dir / "checkpoints", again / "checkpoints")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (again / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    logs: list[str] = []
    run_recipe("sft", tmp_path / "job", again, log=logs.append, service=service, resume=True)
    assert any("resumed from tinker://" in line and "(step 2)" in line for line in logs), logs
    assert step_losses(again) == pytest.approx(first, rel=1e-5)
