import json
from typing import Any
from unittest.mock import ANY

import pytest

from vlmtune.config import load_job
from vlmtune.data.report import ValidationReport
from vlmtune.recipes.common import (
    Checkpointer,
    batch_indices,
    latest_checkpoint,
    learning_rate_at,
    prepare,
    steps_per_epoch,
    vision_defaults,
)
from vlmtune.recipes.run_dir import RunDir
from vlmtune.types import SaveWeightsResponse


def test_linear_warmup_then_linear_decay_by_hand():
    """10 steps, warmup_ratio 0.2 -> 2 warmup steps: lr = 0.5, 1.0, then decays over 8 steps:
    step 2 -> 1.0, step 6 -> 1 - 4/8 = 0.5, step 9 -> 1 - 7/8 = 0.125."""
    lrs = [learning_rate_at(s, 10, 1.0, 0.2, "linear") for s in range(10)]
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(0.125)


def test_cosine_and_constant():
    assert learning_rate_at(5, 10, 2.0, 0.0, "cosine") == pytest.approx(
        1.0
    )  # halfway: cos(pi/2) = 0
    assert learning_rate_at(7, 10, 2.0, 0.0, "constant") == 2.0


def test_batch_indices_cover_each_epoch_once_and_are_reproducible():
    n, bs = 10, 4
    assert steps_per_epoch(n, bs) == 3
    epoch0 = [i for s in range(3) for i in batch_indices(s, n, bs, seed=1)]
    epoch1 = [i for s in range(3, 6) for i in batch_indices(s, n, bs, seed=1)]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1  # reshuffled per epoch
    assert batch_indices(4, n, bs, seed=1) == batch_indices(4, n, bs, seed=1)
    assert len(batch_indices(2, n, bs, seed=1)) == 2  # short last batch


# -- the run directory, the checkpoint-and-eval step, the shared setup ---------------


class Done:
    """A finished future."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


class FakeClient:
    """The two calls a Checkpointer makes, recorded; states kept at ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.states, self.finals = prefix, [], []

    def save_state(self, name: str, extra: dict[str, Any] | None = None) -> Done:
        self.states.append((name, extra))
        return Done(f"{self.prefix}{name}")

    def save_weights_for_sampler(self, name: str) -> Done:
        self.finals.append(name)
        return Done(SaveWeightsResponse(path=name))


def run_loop(run: RunDir, tc: FakeClient, evals: list[int]) -> dict[str, Any]:
    """7 steps, a checkpoint every 2, an eval every 3, as a recipe's loop takes them."""

    def evaluate(step: int) -> dict[str, Any]:
        evals.append(step)
        return {"eval/n": step}

    every = Checkpointer(tc, run, 7, save_every=2, eval_every=3, evaluate=evaluate, log=print)  # type: ignore[arg-type]
    for step in range(7):
        every.after_step(step + 1)
    return every.finish({"steps": 7})


def test_checkpoints_and_evals_every_n_steps_then_the_final_ones(tmp_path):
    tc, evals = FakeClient("/states/"), []
    summary = run_loop(RunDir(tmp_path, main=True), tc, evals)
    # none after step 7: finish saves the final model and evaluates it
    assert tc.states == [(f"step-{s}", {"step": s}) for s in (2, 4, 6)]
    assert evals == [3, 6, 7]
    assert tc.finals == [str(tmp_path / "final")]
    assert summary.pop("wall_s") >= 0  # how long the run took, for its report
    assert summary == {"steps": 7, "final_dir": str(tmp_path / "final"), "eval/n": 7}
    assert json.loads((tmp_path / "summary.json").read_text()) == {**summary, "wall_s": ANY}
    assert not list(tmp_path.glob("checkpoints/*.remote"))  # in-process: a folder


def test_a_server_checkpoint_is_a_pointer_written_by_rank_0_alone(tmp_path):
    tc = FakeClient("tinker://run-1/weights/")
    run_loop(RunDir(tmp_path / "rank0", main=True), tc, [])
    assert latest_checkpoint(tmp_path / "rank0") == "tinker://run-1/weights/step-6"
    assert sorted(p.name for p in (tmp_path / "rank0").rglob("*")) == [
        "checkpoints", "step-2.remote", "step-4.remote", "step-6.remote", "summary.json",
    ]  # fmt: skip

    # Another rank takes part in every save (a sharded state needs all of them) and
    # computes the same summary, but writes nothing.
    other, evals = FakeClient("tinker://run-1/weights/"), []
    summary = run_loop(RunDir(tmp_path / "rank1", main=False), other, evals)
    assert len(other.states) == 3 and evals == [3, 6, 7] and summary["eval/n"] == 7
    assert list((tmp_path / "rank1").iterdir()) == []


def test_run_dir_writes_whole_files_from_the_main_process_only(tmp_path):
    report = ValidationReport(path="train.jsonl", kind="sft", total=2, valid=1)
    report.drop(2, "not valid JSON")
    for main, folder in ((True, tmp_path / "main"), (False, tmp_path / "other")):
        run = RunDir(folder, main=main)
        run.write_report(report, None)
        run.write_summary({"steps": 1})
        metrics = run.metrics(resume_step=None, total_steps=3)
        metrics.write({"step": 1, "loss": 0.5})
    assert list((tmp_path / "other").iterdir()) == []
    main_dir = tmp_path / "main"
    assert sorted(p.name for p in main_dir.iterdir()) == [  # no temp files left beside
        "metrics.jsonl", "summary.json", "validation_report.json",
    ]  # fmt: skip
    written = json.loads((main_dir / "validation_report.json").read_text())
    assert written == {"train": report.to_dict()}
    assert written["train"]["dropped"] == [{"line": 2, "reason": "not valid JSON"}]
    record = json.loads((main_dir / "metrics.jsonl").read_text())
    assert record == {"step": 1, "total_steps": 3, "loss": 0.5}

    # A resume from step 1 keeps the records up to it and drops the later ones.
    (main_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 1, "eval/n": 3}\n')
    RunDir(main_dir, main=True).metrics(resume_step=1)
    assert (main_dir / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 1, "eval/n": 3}\n'


JOB = """
[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"
[hyperparameters]
gradient_accumulation_steps = 2
"""


def test_prepare_applies_and_logs_the_vision_defaults_once(tmp_path):
    (tmp_path / "job.toml").write_text(JOB)
    job = load_job(tmp_path / "job.toml")
    logs: list[str] = []
    prepare(job, "sft", tmp_path / "run", logs.append)
    assert any(
        x.startswith("vision default: hyperparameters.gradient_accumulation_steps: 2 -> 8 (")
        for x in logs
    ), logs
    import torch

    if not torch.cuda.is_available():
        assert (
            "vision default: training.precision: 'auto' -> 'fp32' (no bf16 on this cpu: fp32)"
            in logs
        )
    assert logs[-1] == f"run directory: {tmp_path / 'run'}"
    # config.toml is the job as it runs: with the defaults
    assert "gradient_accumulation_steps = 8" in (tmp_path / "run" / "config.toml").read_text()
    assert job.hyperparameters.gradient_accumulation_steps == 8
    # Applied again (a second run of the same job object): nothing left to change.
    assert vision_defaults(job, "sft") == []


def test_a_servers_engine_resolves_precision_itself(tmp_path):
    """On a server the device is not this machine's: precision stays "auto" for the
    engine there, and the other vision defaults still apply."""
    (tmp_path / "job.toml").write_text(JOB)
    job = load_job(tmp_path / "job.toml")
    not_in_process = object()  # what matters: not an in-process ServiceClient
    changes = {c.key for c in vision_defaults(job, "sft", not_in_process)}  # type: ignore[arg-type]
    assert "hyperparameters.gradient_accumulation_steps" in changes
    assert "training.precision" not in changes and job.training.precision == "auto"
