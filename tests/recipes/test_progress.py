"""The progress display: time left, the rhythm of plain lines, what each recipe shows,
and the lines a tiny SFT, DPO and RL run print when their output is not a terminal."""

from __future__ import annotations

import io
import math
import re

from typer.testing import CliRunner

from tests.recipes.test_dpo import write_dpo_job
from tests.recipes.test_rl import job_toml, write_prompts
from tests.recipes.test_sft import job_file
from vlmtune.cli import app
from vlmtune.recipes.progress import (
    MovingAverage,
    ProgressBar,
    dpo_fields,
    eta_seconds,
    format_eta,
    plain_line,
    rl_fields,
    sft_fields,
)

runner = CliRunner()


def test_format_eta_rounds_up_to_whole_seconds():
    assert format_eta(None) == "?"
    assert format_eta(math.nan) == "?"
    assert format_eta(-1.0) == "?"
    assert format_eta(0.0) == "0s"  # done
    assert format_eta(0.2) == "1s"  # not done yet: never "0s"
    assert format_eta(59.0) == "59s"
    assert format_eta(59.5) == "1m 00s"
    assert format_eta(185.0) == "3m 05s"  # 3 * 60 + 5
    assert format_eta(7380.0) == "2h 03m"  # 2 * 3600 + 3 * 60
    assert format_eta(90_000.0) == "25h 00m"


def test_eta_is_the_mean_step_time_after_the_first_step_times_the_steps_left():
    # This process's first step (a resume's step 5) ended at t=100: its time, warm-up
    # included, is not counted, and with no step since there is no estimate.
    assert eta_seconds(5, 100.0, 5, 100.0, 20) is None
    # steps 6..8 ended by t=112: 12 s / 3 steps = 4 s a step, 12 steps left -> 48 s
    assert eta_seconds(5, 100.0, 8, 112.0, 20) == 48.0
    assert eta_seconds(5, 100.0, 20, 160.0, 20) == 0.0  # done
    assert eta_seconds(0, 7.0, 1, 7.0, 1) == 0.0  # a one-step run is done after it


def test_moving_average_weighs_steps_by_their_size_over_the_window():
    avg = MovingAverage(3)
    assert math.isnan(avg.value) and len(avg) == 0
    assert avg.add(1.0, 2) == 0.5  # 1/2
    assert avg.add(0.0, 2) == 0.25  # (1 + 0) / (2 + 2)
    assert avg.add(3.0, 4) == 0.5  # (1 + 0 + 3) / (2 + 2 + 4)
    assert avg.add(2.0, 2) == 5 / 8  # the first step left: (0 + 3 + 2) / (2 + 4 + 2)
    assert len(avg) == 3


def test_what_each_recipe_shows():
    # SFT: 8 examples, 2,000 positions in 0.5 s
    assert sft_fields(1.23456, 8, 2000, 0.5) == ["loss 1.2346", "16.0 ex/s", "4,000 tok/s"]
    # DPO: 16 pairs (32 sequences) in 2 s -> 8 pairs/s, not 16 "examples"/s
    assert dpo_fields(0.6931, 0.5, 16, 2.0) == ["loss 0.6931", "reward accuracy 0.50", "8.0 pairs/s"]  # fmt: skip
    # RL: step 1 scored [1, 0, 1, 1] in 2 groups, one of them all 1 (skipped); step 2
    # scored [0, 0, 0, 0], both groups skipped. 3/8 reward, 3/4 groups skipped.
    reward, skipped = MovingAverage(10), MovingAverage(10)
    reward.add(3.0, 4), skipped.add(1, 2)
    assert rl_fields(reward.value, skipped.value, len(reward), 32, 4.0) == [
        "reward 0.750, 50% groups skipped (last step)",
        "8.0 samples/s",
    ]
    reward.add(0.0, 4), skipped.add(2, 2)
    assert rl_fields(reward.value, skipped.value, len(reward), 32, 2.5) == [
        "reward 0.375, 75% groups skipped (last 2 steps)",
        "12.8 samples/s",
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_come_after_the_first_step_every_10_s_and_after_the_last():
    """30 steps: the first ends at t=100 (warm-up), then one every 2 s (step k at
    100 + 2 (k - 1)). Lines: step 1; step 6 (t=110, 10 s after the last line); 11, 16,
    21, 26; and step 30, the last, only 8 s after step 26's."""
    clock, out = FakeClock(), io.StringIO()
    with ProgressBar(30, 0, "sft", stream=out, clock=clock, every_s=10.0) as bar:
        for step in range(1, 31):
            clock.now = 100.0 + 2 * (step - 1)
            bar.update(step, [f"loss {1 / step:.4f}"])
    lines = out.getvalue().splitlines()
    assert [int(re.match(r"step (\d+)/30", x)[1]) for x in lines] == [1, 6, 11, 16, 21, 26, 30]
    assert lines[0] == "step 1/30  loss 1.0000  time left ?"
    # 2 s a step since step 1: 24 steps left after step 6 -> 48 s
    assert lines[1] == "step 6/30  loss 0.1667  time left 48s"
    assert lines[2] == "step 11/30  loss 0.0909  time left 38s"
    assert lines[-1] == "step 30/30  loss 0.0333  time left 0s"


def test_a_resumed_run_counts_only_its_remaining_steps_at_its_own_pace():
    clock, out = FakeClock(), io.StringIO()
    with ProgressBar(30, 10, "dpo", stream=out, clock=clock, every_s=0.0) as bar:
        clock.now = 50.0  # step 11, this process's first: includes loading and warm-up
        bar.update(11, ["loss 0.5000"])
        clock.now = 53.0  # 3 s a step, 18 steps left
        bar.update(12, ["loss 0.4000"])
    assert out.getvalue().splitlines() == [
        "step 11/30  loss 0.5000  time left ?",
        "step 12/30  loss 0.4000  time left 54s",
    ]
    assert plain_line(12, 30, [], 3 * 18.0) == "step 12/30  time left 54s"


# -- the lines real tiny runs print (CliRunner's output is not a terminal) ------------

PROGRESS_LINE = re.compile(r"^step (\d+)/(\d+)  (.*)  time left (\S+)$", re.MULTILINE)


def progress_lines(output: str) -> list[tuple[int, int, str, str]]:
    return [(int(m[1]), int(m[2]), m[3], m[4]) for m in PROGRESS_LINE.finditer(output)]


def test_tiny_sft_prints_loss_examples_and_tokens_per_s_and_what_it_is_doing(tmp_path):
    toml = job_file(tmp_path)
    args = ["train", "--type", "sft", "--config", str(toml), "--output", str(tmp_path / "run")]
    overrides = ["hyperparameters.max_steps=3", "hyperparameters.save_every=1"]
    overrides += ["hyperparameters.eval_every=2"]
    result = runner.invoke(app, [*args, *overrides])
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.output)
    # a line after the first step and after the last, the steps between within 10 s
    assert [(s, t) for s, t, _, _ in lines] == [(1, 3), (3, 3)]
    assert lines[0][3] == "?" and lines[-1][3] == "0s"
    assert re.fullmatch(r"loss \d+\.\d{4}  \d+\.\d ex/s  [\d,]+ tok/s", lines[0][2])
    out = result.output
    # the pauses between steps are announced before they start
    for said in ("step 1: saving a checkpoint ...", "step 2: evaluating ...", "saving the final model ...", "step 3: evaluating the final model ..."):  # fmt: skip
        assert said in out
    assert out.index("step 2: evaluating ...") < out.index("eval @ step 2:")


def test_tiny_dpo_prints_pairs_per_s(tmp_path):
    toml = write_dpo_job(tmp_path)
    args = ["train", "--type", "dpo", "--config", str(toml), "--output", str(tmp_path / "run")]
    result = runner.invoke(app, [*args, "hyperparameters.max_steps=1"])
    assert result.exit_code == 0, result.output
    ((step, total, shown, left),) = progress_lines(result.output)
    assert (step, total, left) == (1, 1, "0s")
    # step 1 runs on the reference weights: loss log 2, every pair a tie (accuracy 0.5)
    assert re.fullmatch(r"loss 0\.6931  reward accuracy 0\.50  \d+\.\d pairs/s", shown)
    assert "ex/s" not in result.output
    assert "reference log-probs of 6 pairs ..." in result.output  # 4 trained, 2 held out


def test_tiny_rl_prints_the_moving_reward_and_skipped_share(tmp_path, monkeypatch):
    (tmp_path / "progress_reward_mod.py").write_text("def one(completion, row):\n    return 1.0\n")  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    write_prompts(tmp_path / "train.jsonl", [{}, {}])
    rl = 'reward = "progress_reward_mod:one"\ngroup_size = 2\nprompts_per_step = 1\nmax_tokens = 1'
    result = runner.invoke(
        app,
        ["train", "--type", "rl", "--config", str(job_toml(tmp_path, rl, validation=False)),
         "--output", str(tmp_path / "run"), "hyperparameters.max_steps=2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.output)
    assert [(s, t) for s, t, _, _ in lines] == [(1, 2), (2, 2)]
    # every sample scores 1: each group's rewards are equal, so every group is skipped
    assert re.fullmatch(
        r"reward 1\.000, 100% groups skipped \(last step\)  \d+\.\d samples/s", lines[0][2]
    )
    assert lines[1][2].startswith("reward 1.000, 100% groups skipped (last 2 steps)  ")


def test_a_terminal_gets_the_bar_not_plain_lines():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, clock = Terminal(), FakeClock()
    with ProgressBar(2, 0, "rl", stream=out, clock=clock) as bar:
        bar.update(1, ["reward 0.500, 0% groups skipped (last step)"])
        clock.now = 3.0
        bar.update(2, ["reward 1.000, 50% groups skipped (last 2 steps)"])
    shown = out.getvalue()
    assert "step 2/2" not in shown  # no plain lines
    assert "2/2" in shown and "reward 1.000, 50% groups skipped (last 2 steps)" in shown
    assert "time left 0s" in shown
