"""`vlmtune train --nproc N`: one command launches torchrun; the run equals one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import png_data_url
from tests.tiny_job import tiny_job
from vlmtune.cli import app

runner = CliRunner()


def write_job(tmp_path: Path, extra: str = "") -> Path:
    rows = []
    for i in range(12):
        content = [
            {"type": "image_url", "image_url": {"url": png_data_url(32, 32, seed=i % 3)}},
            {"type": "text", "text": "What digit is this?"},
        ]
        if i % 4 == 3:  # some text-only rows: ranks must not hang on the vision tower
            content = f"Say {i % 3}."
        msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": str(i % 3)}]
        rows.append(json.dumps({"messages": msgs}))
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(rows[:3]) + "\n")
    toml = tmp_path / "job.toml"
    toml.write_text(
        tiny_job(
            job='validation_data = "val.jsonl"',
            hyperparameters="n_epochs = 2\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\n"
            "save_every = 2\nmax_steps = 3\neval_max_new_tokens = 2",
            extra=extra,
        )
    )
    return toml


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_nproc_2_run_equals_one_process_and_only_rank_0_writes(tmp_path, tiny_dir):
    toml = write_job(tmp_path)
    base = ["train", "--type", "sft", "--config", str(toml), "--output"]
    one = runner.invoke(app, [*base, str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = runner.invoke(app, [*base, str(tmp_path / "two"), "--nproc", "2"])
    assert two.exit_code == 0, two.output
    assert "launching 2 processes" in two.output

    steps_one = [r for r in records(tmp_path / "one") if "loss" in r]
    steps_two = [r for r in records(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in steps_two] == [1, 2, 3]  # one line per step: rank 0 alone
    for a, b in zip(steps_one, steps_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    evals = [r for r in records(tmp_path / "two") if "eval/loss" in r]
    assert len(evals) == 1
    assert evals[0]["eval/loss"] == pytest.approx(records(tmp_path / "one")[-1]["eval/loss"], 1e-4)

    # FSDP2 in one process ([compute] fsdp, here as an override), in a fresh process so
    # that its process group of one does not outlive the test.
    alone = subprocess.run(
        [sys.executable, "-c", "from vlmtune.cli import main; main()"]
        + [*base, str(tmp_path / "alone"), "compute.fsdp=true"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    assert "FSDP2 over 1 process)" in alone.stdout + alone.stderr
    assert "model tiny-qwen3-vl (lora; cpu float32):" in one.output  # not sharded
    steps_alone = [r for r in records(tmp_path / "alone") if "loss" in r]
    for a, b in zip(steps_one, steps_alone, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)

    shards = sorted(p.name for p in (tmp_path / "two/checkpoints/step-2/dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    final = tmp_path / "two" / "final"
    assert (final / "adapter_config.json").exists()
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), final)
    # The gathered adapter alone (~0.2 MB and processor files), loadable without vlmtune.
    assert sum(f.stat().st_size for f in final.iterdir()) < 1e6
    AutoModelForImageTextToText.from_pretrained(final, local_files_only=True)


def test_dry_run_prints_the_torchrun_command_of_every_node(tmp_path):
    toml = write_job(tmp_path, '[compute]\ngpu_type = "cpu"\ngpu_count = 2\nnodes = 3')
    result = runner.invoke(
        app, ["train", "--config", str(toml), "--dry-run", "training.device=cpu"]
    )
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if "torch.distributed.run" in x]
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        assert "VLMTUNE_LAUNCHED=1" in line
        assert "--nnodes=3" in line and f"--node-rank={rank}" in line
        assert "--nproc-per-node 2" in line and "--rdzv-endpoint=" in line
        assert line.rstrip().endswith("training.device=cpu")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[compute]\ngpu_count = 4", ["compute.gpu_count", "--nproc"]),
        ("[compute]\ncpu_offload = true", ["compute.cpu_offload"]),
        (
            '[training]\nattention = "flash_attention_2"',
            ["training.attention: flash_attention_2 needs a CUDA GPU"],
        ),
    ],
    ids=["gpus", "cpu_offload", "flash_attention"],
)
def test_gpu_only_settings_on_a_cpu_machine_are_config_errors(tmp_path, extra, expected):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    toml = write_job(tmp_path, extra)
    result = runner.invoke(app, ["train", "--config", str(toml)])
    assert result.exit_code == 2
    for text in expected:
        assert text in result.output


def test_a_cpu_shape_launches_its_process_count(tmp_path):
    toml = write_job(tmp_path)
    text = toml.read_text().replace('model = "tiny-qwen3-vl"\n', "")
    text = text.replace("sequence_length = 128\n", "")
    toml.write_text(text + '[compute]\nshape = "tiny-2k-cpu2"\n')
    result = runner.invoke(app, ["train", "--config", str(toml), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "launching 2 processes" in result.output and "--standalone" in result.output


# Installed in every torchrun rank (a sitecustomize on PYTHONPATH): an audit hook that
# records, per rank, each file opened for writing and each rename's target. What a rank
# wrote is then read from outside, with nothing in vlmtune changed for the test.
WRITE_AUDIT = """
import os, sys

_rank, _out = os.environ.get("RANK"), os.environ.get("VLMTUNE_TEST_WRITES")
if _rank is not None and _out:
    _log = open(os.path.join(_out, f"rank{_rank}.txt"), "a", buffering=1)

    def _audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            if isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR):
                _log.write(f"write {os.fsdecode(args[0])}\\n")
        elif event == "os.rename":
            _log.write(f"rename {os.fsdecode(args[1])}\\n")

    sys.addaudithook(_audit)
"""
RUN_FILES = ("config.toml", "validation_report.json", "summary.json", "metrics.jsonl")


def writes_per_rank(tmp_path: Path, method: str, toml: Path, run: Path) -> dict[str, list[str]]:
    """Run ``vlmtune train --nproc 2`` in a fresh process; each rank's writes under ``run``
    (``write``/``rename`` and the path relative to ``run``)."""
    hooks, audit = tmp_path / "hooks", tmp_path / f"audit-{method}"
    hooks.mkdir(exist_ok=True)
    audit.mkdir()
    (hooks / "sitecustomize.py").write_text(WRITE_AUDIT)
    path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", "from vlmtune.cli import main; main()", "train"]
        + ["--type", method, "--config", str(toml), "--output", str(run), "--nproc", "2"]
        + ["hyperparameters.max_steps=2", "hyperparameters.save_every=1"],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "PYTHONPATH": path, "VLMTUNE_TEST_WRITES": str(audit)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.count("run directory: ") == 1  # rank 0 alone logs
    out: dict[str, list[str]] = {}
    for rank in ("0", "1"):
        lines = (audit / f"rank{rank}.txt").read_text().splitlines()
        out[rank] = [
            f"{kind} {Path(p).relative_to(run)}"
            for kind, p in (line.split(" ", 1) for line in lines)
            if Path(p).is_relative_to(run)
        ]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "rl"])
def test_only_rank_0_writes_the_run_files_each_once_and_whole(tmp_path, method):
    from tests.recipes.test_dpo import write_dpo_job
    from tests.recipes.test_rl import REWARD_FILE, job_toml, write_prompts

    if method == "dpo":
        toml = write_dpo_job(tmp_path)
    else:
        (tmp_path / "digits.py").write_text(REWARD_FILE)
        write_prompts(tmp_path / "train.jsonl", [{}, {}])
        write_prompts(tmp_path / "val.jsonl", [{"answer": "3"}])
        rl = (
            'reward = "digits.py:alternating"\ngroup_size = 2\nprompts_per_step = 2\nmax_tokens = 2'
        )
        toml = job_toml(tmp_path, rl)
    run = tmp_path / "run"
    writes = writes_per_rank(tmp_path, method, toml, run)

    # Rank 1 writes its shard of the step-1 checkpoint (so the audit sees its writes),
    # but none of the run's files.
    assert any(w.startswith("write checkpoints/") for w in writes["1"]), writes["1"]
    assert not [w for w in writes["1"] if w.split(" ", 1)[1] in RUN_FILES], writes["1"]
    for name in ("config.toml", "validation_report.json", "summary.json"):
        # written beside, renamed into place, once
        assert writes["0"].count(f"rename {name}") == 1, (name, writes["0"])
        assert f"write {name}" not in writes["0"]
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    if method == "dpo":
        assert writes["0"].count("rename reference_logps.json") == 1
        assert not [w for w in writes["1"] if "reference_logps" in w]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and "eval/n" in summary
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp file left
