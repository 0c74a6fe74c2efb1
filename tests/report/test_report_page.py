"""The report of a run directory: what it reads, which plots it draws, what it says.

Run directories are built by hand (``run_dirs.make_run``) in the recipes' shapes."""

from __future__ import annotations

import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.report.run_dirs import make_run
from vlmtune.cli import app
from vlmtune.report import ReportError, build_report, read_run
from vlmtune.report.plots import eval_figures, train_figures
from vlmtune.report.run_data import RUNNING_WITHIN_S

runner = CliRunner()


class Page(HTMLParser):
    """What a test asks of a page: figures by title, data URLs, the predictions' sections."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.titles: list[str] = []
        self.srcs: list[str] = []
        self.sections: dict[str, int] = {}
        self.external: list[str] = []
        self._in_caption_b = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "b":
            self._in_caption_b = True
        if tag == "img":
            self.srcs.append(a.get("src") or "")
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)
        for name in ("src", "href"):
            if (a.get(name) or "").startswith(("http:", "https:", "//")):
                self.external.append(a[name] or "")
        classes = (a.get("class") or "").split()
        if "predictions" in classes:
            self.sections[classes[1]] = int(a.get("data-count") or -1)

    def handle_endtag(self, tag: str) -> None:
        if tag == "b":
            self._in_caption_b = False

    def handle_data(self, data: str) -> None:
        if self._in_caption_b:
            self.titles.append(data.rstrip("."))


def test_an_sft_run_gets_its_curves_data_report_settings_and_predictions(tmp_path):
    run = make_run(tmp_path / "run", "sft", right=3, wrong=2)
    html = build_report(run)
    page = Page(html)
    assert page.titles == ["Loss", "Learning rate", "Gradient norm", "Throughput",
                           "Tokens per second", "Packing efficiency",
                           "Eval loss", "Eval accuracy"]  # fmt: skip
    assert not page.external  # self-contained: nothing to fetch
    assert page.sections == {"wrong": 2, "right": 3}
    assert len(page.srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    assert "Predictions at step 40: 3 of 5 right" in html
    # the header: method, status, steps, wall time, the final numbers
    assert "SFT (supervised fine-tuning)" in html and ">finished<" in html
    assert "40 of 40" in html and "1m 15s" in html
    assert "eval exact match" in html and "80.0%" in html
    # the data report: kept and dropped by reason (numbers aside, one group), the cap
    assert re.search(r"kept</td><td class=num>17<", html)
    assert "<td class=num>2</td><td>too long: 300 tokens" in html
    assert "images dropped by the cap (1 per message)</td><td class=num>2<" in html
    # the vision defaults applied: key, old -> new, why
    assert "<code>training.precision</code>" in html and "no bf16 on this cpu" in html
    assert "<code>&quot;auto&quot;</code> &rarr; <code>&quot;fp32&quot;</code>" in html
    assert "warmupSteps: not used" in html


def test_dpo_shows_chosen_and_rejected_rewards_and_rl_the_reward_spread(tmp_path):
    dpo = Page(build_report(make_run(tmp_path / "dpo", "dpo")))
    assert {"Chosen and rejected rewards", "Reward accuracy", "Throughput"} <= set(dpo.titles)
    assert "Tokens per second" not in dpo.titles  # DPO records pairs/s only

    rl_run = read_run(make_run(tmp_path / "rl", "rl"))
    titles = [f.title for f in train_figures(rl_run)]
    assert titles[:3] == ["Reward per step", "Skipped groups", "Learning rate"]
    assert "Loss" not in titles  # RL's surrogate loss is no progress measure
    reward = train_figures(rl_run)[0].svg
    assert reward.count("<polygon") == 2  # min-max and the middle half
    assert 'data-label="mean"' in reward and 'data-label="median"' in reward


def test_a_two_valued_reward_is_shown_as_the_shares_of_its_values(tmp_path):
    run = read_run(make_run(tmp_path / "rl", "rl"))
    for r in run.train:  # exact match: every sample 0 or 1, a quarter of them 1
        r.update(reward_mean=0.25, reward_min=0.0, reward_p25=0.0, reward_median=0.0,
                 reward_p75=1.0, reward_max=1.0)  # fmt: skip
    reward = train_figures(run)[0]
    assert "only the values 0 and 1" in reward.caption
    assert reward.svg.count("<polygon") == 2 and "reward 1" in reward.svg
    assert "share at 1" in reward.svg and 'data-label="median"' not in reward.svg


def test_rl_predictions_without_reference_answers_are_split_by_their_reward(tmp_path):
    run_dir = make_run(tmp_path / "rl", "rl", right=0, wrong=3)
    step_file = run_dir / "evals" / "step-40.jsonl"
    records = [json.loads(x) for x in step_file.read_text().splitlines()]
    for r, reward in zip(records, (0.0, 0.5, 1.0), strict=True):
        r.update(answer="", correct=False, reward=reward)  # a custom reward, no metadata.answer
    step_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    html = build_report(run_dir)
    assert Page(html).sections == {"wrong": 1, "right": 2}
    assert "2 of 3 rewarded" in html and "Not rewarded (1)" in html
    assert '<span class="label">reward</span> 0.5' in html


def test_a_plot_appears_only_when_the_run_has_its_data(tmp_path):
    run = read_run(make_run(tmp_path / "run", "sft", eval_every=40))  # one eval: no curve
    assert eval_figures(run) == []
    html = build_report(run.path)
    assert "Last eval, at the end of training" in html  # its numbers, in a table
    for record in run.train:
        del record["packing_efficiency"]
    assert "Packing efficiency" not in [f.title for f in train_figures(run)]


def test_a_run_in_progress_is_running_then_stopped_and_has_no_summary(tmp_path):
    run_dir = make_run(tmp_path / "run", "sft", steps=25, finished=False)
    run = read_run(run_dir)
    assert run.summary is None and run.last_step == 25 and run.total_steps == 25
    assert run.status() == "running"
    assert run.status(now=time.time() + RUNNING_WITHIN_S + 1) == "stopped"
    html = build_report(run_dir, status="queued")  # a server's job state wins
    assert ">queued<" in html and "No summary.json yet" in html
    assert "Predictions at step 20" in html  # the last eval so far


def test_broken_lines_and_missing_files_are_said_not_fatal(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n[1]\n')
    run = read_run(run_dir)
    assert run.broken_lines == [2, 3] and run.method == "sft" and run.name == "run"
    html = build_report(run_dir)
    assert "2 line(s) of metrics.jsonl were not JSON" in html
    assert "No validation_report.json" in html and "Not recorded" in html
    assert "No eval" in html


def test_a_folder_that_is_no_run_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="not a run directory"):
        read_run(tmp_path)
    with pytest.raises(ReportError, match="no such run directory"):
        read_run(tmp_path / "missing")


def test_an_image_name_outside_the_run_is_not_inlined(tmp_path):
    run_dir = make_run(tmp_path / "run", "sft", right=1, wrong=0)
    (tmp_path / "secret.png").write_bytes(b"\x89PNG not yours")
    step_file = run_dir / "evals" / "step-40.jsonl"
    record = json.loads(step_file.read_text())
    record["images"] = ["evals/images/../../../secret.png"]
    step_file.write_text(json.dumps(record) + "\n")
    run = read_run(run_dir)
    assert run.predictions is not None
    assert run.predictions.image(record["images"][0]) is None
    assert "<img" not in build_report(run_dir)


def test_the_cli_writes_one_file_and_refuses_a_folder_that_is_no_run(tmp_path):
    run_dir = make_run(tmp_path / "run", "rl")
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    written = Path(result.output.strip().splitlines()[-1])
    assert written == run_dir / "report.html"
    assert "Reward per step" in written.read_text()

    out = tmp_path / "elsewhere" / "r.html"
    assert runner.invoke(app, ["report", str(run_dir), "-o", str(out)]).exit_code == 0
    assert out.is_file()

    bad = runner.invoke(app, ["report", str(tmp_path / "elsewhere")])
    assert bad.exit_code == 2 and "not a run directory" in bad.output
    assert "Traceback" not in bad.output


def test_the_report_imports_no_torch(tmp_path):
    """``vlmtune report`` reads files: importing torch would cost seconds for nothing
    (the run-file names live in recipes/run_files.py, away from the writers' imports)."""
    import subprocess
    import sys

    run = make_run(tmp_path, "sft")
    probe = (
        "import sys; from vlmtune.cli import app; from vlmtune.report import build_report; "
        f"build_report({str(run)!r}); print(sorted(m for m in sys.modules if m == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
