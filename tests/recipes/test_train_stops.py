"""How `vlmtune train` stops before the end, each with one message and no traceback: a
sequence_length that keeps no example (exit 2, before the model loads), Ctrl-C (130,
what was saved and the command that resumes), a disk that refuses a write (1, the path
and the free space; the last checkpoint intact), and a run diverging on a server."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.recipes.test_divergence import HUGE_LR
from tests.recipes.test_resume_resilience import MODEL_LOADED, train, write_job
from tests.recipes.test_rl import job_toml, write_prompts
from vlmtune.atomic import refused_write_cause
from vlmtune.cli import app
from vlmtune.cli.train_stops import interrupted_message, job_failure_text, resume_command
from vlmtune.config import load_job
from vlmtune.data import load_dataset
from vlmtune.engine.checkpoint import checkpoint_problem
from vlmtune.engine.divergence import DivergedError
from vlmtune.recipes.common import stop_on_divergence
from vlmtune.recipes.preflight import sequence_length_problem
from vlmtune.render_rows import RenderLimits, build_renderer
from vlmtune.sdk.http import RemoteError

runner = CliRunner()


# -- 1. a sequence_length that keeps nothing ---------------------------------------------


def _needed(output: str) -> int:
    found = re.search(r"needs sequence_length >= (\d+) \(rows are dropped", output)
    assert found, output
    return int(found.group(1))


def test_sft_sequence_length_below_every_example_is_exit_2_before_the_model_loads(tmp_path):
    toml = write_job(tmp_path)
    result = train(toml, tmp_path / "run", "hyperparameters.sequence_length=16")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and MODEL_LOADED not in result.output
    assert re.search(
        r"hyperparameters\.sequence_length: 16 keeps none of the examples: the shortest "
        r"\(line \d+\) is \d+ tokens and needs sequence_length >= \d+",
        result.output,
    ), result.output

    # The value it names keeps the shortest row, and one less keeps none.
    needed = _needed(result.output)
    job = load_job(toml)
    rows, _ = load_dataset(tmp_path / "train.jsonl", "sft", max_images_per_message=1)
    renderer = build_renderer("tiny-qwen3-vl", min_pixels=4096, max_pixels=4096)
    assert (
        sequence_length_problem(rows, renderer, RenderLimits(needed, job.hyperparameters.train_on))
        is None
    )
    assert sequence_length_problem(rows, renderer, RenderLimits(needed - 1)) is not None


def test_rl_counts_the_sampled_tokens_in_the_length_it_asks_for(tmp_path):
    write_prompts(tmp_path / "train.jsonl", [{}, {}])
    toml = job_toml(tmp_path, 'reward = "exact_match"\nmax_tokens = 8', validation=False)
    out = tmp_path / "run"
    args = ["train", "--type", "rl", "--config", str(toml), "--output", str(out)]
    result = runner.invoke(app, [*args, "hyperparameters.sequence_length=16"])
    assert result.exit_code == 2, result.output
    assert MODEL_LOADED not in result.output
    found = re.search(r"keeps none of the prompts: the shortest \(line 1\) is (\d+) tokens "
                      r"\+ rl.max_tokens 8 and needs sequence_length >= (\d+)", result.output)  # fmt: skip
    assert found, result.output
    assert int(found.group(2)) == int(found.group(1)) + 8 - 1


# -- 6. Ctrl-C ----------------------------------------------------------------------------


def test_resume_command_adds_resume_after_train_once():
    argv = ["/x/vlmtune", "train", "--config", "a b.toml", "lora.r=4"]
    assert resume_command(argv) == "vlmtune train --resume --config 'a b.toml' lora.r=4"
    assert resume_command([*argv, "--resume"]) == "vlmtune " + " ".join(
        ["train", "--config", "'a b.toml'", "lora.r=4", "--resume"]
    )


def test_interrupted_before_any_checkpoint_says_so(tmp_path):
    message = interrupted_message(tmp_path / "run", ["vlmtune", "train", "-c", "j.toml"])
    assert message == (
        f"interrupted: nothing saved yet (no checkpoint in {tmp_path / 'run' / 'checkpoints'})\n"
        "to resume: vlmtune train --resume -c j.toml"
    )


def _ctrl_c_reaches_it() -> None:
    # A shell starts background jobs with SIGINT ignored and a child inherits that, so
    # under `make test &` (or a CI runner doing the same) the Ctrl-C below never came.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_after_a_checkpoint_names_it_and_the_resume_command(tmp_path):
    toml = write_job(tmp_path, "")
    out = tmp_path / "run"
    args = ["train", "--type", "sft", "--config", str(toml), "--output", str(out),
            "hyperparameters.n_epochs=200"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmtune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_ctrl_c_reaches_it,
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-1").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    found = re.search(r"interrupted: the last checkpoint is (\S+) \(step (\d+)\)\n", stderr)
    assert found, stderr
    saved = Path(found.group(1))
    assert saved == out / "checkpoints" / f"step-{found.group(2)}"
    assert checkpoint_problem(saved) is None
    steps = [int(p.name.removeprefix("step-")) for p in (out / "checkpoints").iterdir()]
    assert max(steps) == int(found.group(2))  # the newest: a save under way was finished
    assert f"to resume: vlmtune train --resume {' '.join(args[1:])}\n" in stderr
    assert not (out / "final").exists()


# -- 7. a disk that refuses a write -------------------------------------------------------


def _after_first_checkpoint(run: Path, error: BaseException, original):
    """``original`` until checkpoints/step-1 exists, then raising ``error``."""

    def refuse(*args, **kwargs):
        if (run / "checkpoints" / "step-1").is_dir():
            raise error
        return original(*args, **kwargs)

    return refuse


TORCH_FULL = RuntimeError(
    "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
    "data/0: file write failed"
)


@pytest.mark.parametrize("case", ["dcp ENOSPC", "torch.save full", "metrics EROFS"])
def test_a_refused_write_names_the_path_and_free_space_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, case
):
    import torch.distributed.checkpoint.filesystem as dcp_files

    out = tmp_path / "run"
    if case == "dcp ENOSPC":  # inside DCP: it arrives wrapped in a CheckpointException
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        refuse = _after_first_checkpoint(out, error, dcp_files._write_item)
        monkeypatch.setattr(dcp_files, "_write_item", refuse)
        path, what, cause = (
            out / "checkpoints/step-2",
            "the checkpoint of step 2",
            "No space left on device",
        )
    elif case == "torch.save full":  # how torch.save reports a full disk
        monkeypatch.setattr(torch, "save", _after_first_checkpoint(out, TORCH_FULL, torch.save))
        path, what, cause = (
            out / "checkpoints/step-2",
            "the checkpoint of step 2",
            "the disk refused the write ([enforce fail at inline_container.cc",
        )
    else:
        opener = Path.open

        def open_metrics(self, mode="r", *args, **kwargs):
            if self.name == "metrics.jsonl" and mode == "a":
                return _after_first_checkpoint(
                    out, OSError(errno.EROFS, os.strerror(errno.EROFS)), opener
                )(self, mode, *args, **kwargs)
            return opener(self, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_metrics)
        path, what, cause = out / "metrics.jsonl", "the metrics of step 2", "Read-only file system"

    result = train(write_job(tmp_path), out)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert f"training stopped: {path}: could not write {what}: {cause}" in result.output
    assert re.search(r"; its filesystem has [\d.]+ \w+ free of [\d.]+ \w+ \(", result.output)
    assert checkpoint_problem(out / "checkpoints" / "step-1") is None
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]  # no temporaries
    assert not (out / "final").exists()


def test_refusals_without_an_errno_are_recognised_and_other_errors_are_not():
    safetensors = Exception(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
        'left on device" })'
    )
    assert refused_write_cause(safetensors).startswith("the disk refused the write (Error while")
    assert refused_write_cause(OSError(errno.EDQUOT, "Disk quota exceeded")) == os.strerror(
        errno.EDQUOT
    )
    assert refused_write_cause(OSError(errno.ENOENT, "No such file")) is None
    assert refused_write_cause(RuntimeError("CUDA out of memory")) is None


# -- 9. divergence on a server ---------------------------------------------------------------


def test_a_server_engine_refusing_a_step_stops_the_run_as_a_local_one_does(tmp_path):
    remote = RemoteError(500, "DivergedError: grad_norm is nan; the optimizer step was not applied")
    with pytest.raises(DivergedError) as stopped, stop_on_divergence(tmp_path, 2, 1e30):
        raise remote
    assert str(stopped.value).startswith(
        "step 2: grad_norm is nan; the optimizer step was not applied — the learning rate "
        "(1e+30) is likely too high"
    )
    with pytest.raises(RemoteError), stop_on_divergence(tmp_path, 2):
        raise RemoteError(500, "internal error: ValueError: something else")


def test_a_failed_server_job_shows_its_training_stopped_line():
    tail = "Loading weights: 100%\nstep 1/3  loss 14.2\ntraining stopped: step 2: grad_norm is nan"
    assert job_failure_text(tail) == "training stopped: step 2: grad_norm is nan"
    assert job_failure_text("Traceback ...\nValueError: x") == "Traceback ...\nValueError: x"
    assert job_failure_text(None) == ""


def test_sft_on_a_server_that_diverges_ends_with_the_local_message(tmp_path):
    from vlmtune.recipes import sft
    from vlmtune.sdk import connect
    from vlmtune.server import ServerThread
    from vlmtune.server.auth import create_key

    toml = write_job(tmp_path)
    job = load_job(toml, [*HUGE_LR, "hyperparameters.max_steps=2"], method="sft")
    server = ServerThread(tmp_path / "server").start()
    try:
        service = connect(server.url, create_key(server.context.store, "tests"))
        with pytest.raises(DivergedError) as stopped:
            sft.run(job, tmp_path / "run", service=service, log=lambda *a: None)
    finally:
        server.stop()
    assert str(stopped.value).startswith(
        "step 2: grad_norm is nan; the optimizer step was not applied"
    )
    assert "the last good (finite) checkpoint is tinker://" in str(stopped.value)
