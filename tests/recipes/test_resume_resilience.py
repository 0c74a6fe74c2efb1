"""``--resume`` on a damaged run directory: a metrics line cut mid-write, a newest
checkpoint that is not whole, temporaries a kill left behind, and settings that no
longer fit the saved weights. Each is mended with one line, or refused (exit 2) with a
message, before the model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.recipes.test_sft import write_rows
from tests.tiny_job import tiny_job
from vlmtune.atomic import clean_leftovers
from vlmtune.cli import app
from vlmtune.engine.checkpoint import checkpoint_problem, state_differences
from vlmtune.recipes.resume import choose_checkpoint
from vlmtune.recipes.run_dir import ResumeError, RunDir

runner = CliRunner()
# The line `tc.describe()` logs once the model has loaded.
MODEL_LOADED = "model tiny-qwen3-vl ("


def write_job(folder: Path, extra: str = "") -> Path:
    """A LoRA SFT job of 3 steps (all 4 rows a step) that checkpoints after each one."""
    write_rows(folder / "train.jsonl", 4)
    toml = folder / "job.toml"
    toml.write_text(
        tiny_job(
            hyperparameters="n_epochs = 3\ngradient_accumulation_steps = 8\nsave_every = 1",
            extra=extra,
        )
    )
    return toml


def train(toml: Path, out: Path, *args: str):
    return runner.invoke(
        app, ["train", "--type", "sft", "--config", str(toml), "--output", str(out), *args]
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """(job file, run directory) of a finished run: checkpoints/step-1 and step-2."""
    folder = tmp_path_factory.mktemp("finished")
    toml = write_job(folder)
    result = train(toml, folder / "run")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (folder / "run" / "checkpoints").iterdir()) == [
        "step-1",
        "step-2",
    ]
    return toml, folder / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> tuple[Path, Path]:
    toml, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    return toml, tmp_path / "run"


# -- metrics.jsonl ----------------------------------------------------------------------


def test_a_last_metrics_line_cut_mid_write_is_dropped_and_appending_goes_on(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    said: list[str] = []
    metrics = RunDir(tmp_path, main=True, log=said.append).metrics(resume_step=2)
    assert said == [f"{path}:3: dropped an incomplete last line (15 bytes, cut off mid-write)"]
    metrics.write({"step": 3})
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_a_broken_metrics_line_followed_by_others_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n'
    path.write_text(text)
    with pytest.raises(ResumeError, match=rf"{path}:2: not a JSON object"):
        RunDir(tmp_path, main=True).metrics(resume_step=3)
    assert path.read_text() == text  # left as it was, for the user to look at


def test_resume_with_a_cut_metrics_line_continues(run_copy):
    toml, run = run_copy
    (run / "metrics.jsonl").open("a").write('{"step": 3, "loss": 0.')
    result = train(toml, run, "--resume")
    assert result.exit_code == 0, result.output
    assert "metrics.jsonl:4: dropped an incomplete last line" in result.output
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


# -- checkpoints that are not whole ------------------------------------------------------


def _truncate(path: Path, keep: int = 50) -> None:
    path.write_bytes(path.read_bytes()[:keep])


DAMAGE = {
    "truncated shard": (lambda c: _truncate(c / "dcp" / "__0_0.distcp"), "dcp/__0_0.distcp: truncated"),
    "truncated metadata": (lambda c: _truncate(c / "dcp" / ".metadata"), "dcp/.metadata: unreadable"),
    "missing shard": (lambda c: (c / "dcp" / "__0_0.distcp").unlink(), "dcp/__0_0.distcp: missing"),
    "bad state.json": (lambda c: (c / "state.json").write_text('{"step": 2,'), "state.json: JSONDecodeError"),
    "no state.json": (lambda c: (c / "state.json").unlink(), "state.json: missing"),
    "truncated rng": (lambda c: _truncate(c / "rng-0.pt"), "rng-0.pt: unreadable"),
    "missing rng": (lambda c: (c / "rng-0.pt").unlink(), "rng-0.pt: missing"),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE)
def test_each_kind_of_damage_is_found_without_loading(run_copy, damage):
    _, run = run_copy
    ckpt = run / "checkpoints" / "step-2"
    assert checkpoint_problem(ckpt) is None
    harm, problem = DAMAGE[damage]
    harm(ckpt)
    assert (checkpoint_problem(ckpt) or "").startswith(problem)
    said: list[str] = []
    assert choose_checkpoint(run, None, said.append) == str(run / "checkpoints" / "step-1")
    assert said == [f"--resume: skipped checkpoints/step-2: {checkpoint_problem(ckpt)}"]


def test_resume_skips_a_truncated_newest_checkpoint_and_removes_leftovers(run_copy):
    toml, run = run_copy
    _truncate(run / "checkpoints" / "step-2" / "dcp" / "__0_0.distcp")
    # What kills mid-write leave: a checkpoint being written, a metrics rewrite, and the
    # previous step-1 set aside while being replaced (the only whole copy now).
    (run / "checkpoints" / ".step-3.tmp-ab12cd34" / "dcp").mkdir(parents=True)
    (run / ".metrics.jsonl.k3j4h5g6.tmp").write_text("half")
    (run / "checkpoints" / "step-1").rename(run / "checkpoints" / ".step-1.old-4242")

    result = train(toml, run, "--resume")
    assert result.exit_code == 0, result.output
    assert (
        f"an interrupted write left temporaries in {run}: removed .metrics.jsonl.k3j4h5g6.tmp; "
        "restored checkpoints/step-1 (its replacement was never written); "
        "removed checkpoints/.step-3.tmp-ab12cd34"
    ) in result.output
    assert "--resume: skipped checkpoints/step-2: dcp/__0_0.distcp: truncated" in result.output
    assert f"resumed from {run}/checkpoints/step-1 (step 1)" in result.output
    hidden = [
        p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name[0] == "."
    ]
    assert hidden == []
    assert checkpoint_problem(run / "checkpoints" / "step-2") is None  # written again


def test_resume_with_no_whole_checkpoint_is_exit_2_naming_the_run(run_copy):
    toml, run = run_copy
    _truncate(run / "checkpoints" / "step-2" / "rng-0.pt")
    (run / "checkpoints" / "step-1" / "state.json").unlink()
    result = train(toml, run, "--resume")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and MODEL_LOADED not in result.output
    assert f"{run}: --resume: no checkpoint can be resumed from:\n" in result.output
    assert "  checkpoints/step-2: rng-0.pt: unreadable" in result.output
    assert "  checkpoints/step-1: state.json: missing" in result.output


def test_leftovers_of_other_names_are_kept(tmp_path):
    for name in ("step-1", ".hidden", ".step-1.tmp-short", "notes.tmp"):
        (tmp_path / name).mkdir()
    assert clean_leftovers(tmp_path) == []
    assert len(list(tmp_path.iterdir())) == 4


# -- settings that do not fit the saved weights --------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "changes"),
    [
        (["lora.r=8", 'lora.target_modules=["q_proj"]'],
         ['  lora.r: 4 -> 8', '  lora.target_modules: "all-linear" -> ["q_proj"]']),
        (["algorithm.variety=fft"], ['  algorithm.variety: "lora" -> "fft"']),
        (["model.freeze_vision_tower=false"], ["  model.freeze_vision_tower: true -> false"]),
    ],
)  # fmt: skip
def test_resume_under_settings_that_change_the_saved_shapes_is_refused(
    run_copy, overrides, changes
):
    toml, run = run_copy
    config_before = (run / "config.toml").read_text()
    result = train(toml, run, "--resume", *overrides)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert MODEL_LOADED not in result.output  # refused before any weights load
    assert "--resume: checkpoints/step-2 was saved under other settings" in result.output
    assert "\n".join(changes) + "\n" in result.output
    assert (run / "config.toml").read_text() == config_before


def test_another_model_is_a_difference_and_full_fine_tunes_ignore_lora_settings():
    saved = {"base_model": "tiny-qwen3-vl", "mode": "full", "lora_rank": 16}
    assert state_differences(saved, {**saved, "lora_rank": 4}) == []
    assert state_differences(saved, {**saved, "base_model": "/models/other"}) == [
        ("base_model", "tiny-qwen3-vl", "/models/other")
    ]
    lora = {**saved, "mode": "lora"}
    assert state_differences(lora, {**lora, "lora_rank": 4}) == [("lora_rank", 16, 4)]
