"""RL recipe: datum layout, group skipping, reward failures, and CLI runs on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import png_data_url
from vlmtune.cli import app
from vlmtune.config import RLConfig
from vlmtune.recipes.rl import advantages_or_skip, completion_datum
from vlmtune.recipes.skipped_groups import SkippedGroups
from vlmtune.types import EncodedTextChunk, ImageChunk, ModelInput, SampledSequence

runner = CliRunner()
IMG = 99  # stand-in image token id

REWARD_FILE = '''
import itertools

_calls = itertools.count()


def alternating(completion, row):
    """Errors on 'boom' rows, a constant on 'const' rows, else 0, 1, 0, 1, ... (the tiny
    random model's samples mostly decode to '', so a text-based reward would not mix)."""
    if row["metadata"].get("boom"):
        raise ValueError("reward exploded")
    if row["metadata"].get("const"):
        return 0.5
    return float(next(_calls) % 2)
'''


def test_completion_datum_layout():
    """Prompt [1, <img> x2, 2] (P = 4), completion [7, 8, 9] with sampler logprobs
    [-1, -2, -3], advantage 0.5. Input = prompt + [7, 8] (6 positions); position t
    predicts token t+1, so targets = [img, img, 2, 7, 8, 9]; the completion is predicted
    at positions 3..5, which carry the sampler's logprobs and the advantage."""
    prompt = ModelInput(
        chunks=[
            EncodedTextChunk(tokens=[1]),
            ImageChunk(data=b"png", expected_tokens=2),
            EncodedTextChunk(tokens=[2]),
        ]
    )
    seq = SampledSequence(tokens=[7, 8, 9], logprobs=[-1.0, -2.0, -3.0])
    d = completion_datum(prompt, prompt.to_ints(IMG), seq, 0.5)
    assert d.model_input.to_ints(IMG) == [1, IMG, IMG, 2, 7, 8]
    li = d.loss_fn_inputs
    assert li["target_tokens"].data == [IMG, IMG, 2, 7, 8, 9]
    assert li["logprobs"].data == [0.0, 0.0, 0.0, -1.0, -2.0, -3.0]
    assert li["advantages"].data == [0.0, 0.0, 0.0, 0.5, 0.5, 0.5]
    one = completion_datum(prompt, prompt.to_ints(IMG), SampledSequence(tokens=[7]), 1.0)
    assert one.model_input.length == 4 and one.loss_fn_inputs["advantages"].data[-1] == 1.0


def test_groups_with_equal_rewards_are_skipped():
    """[1, 1, 1] has no signal; [1, 0, 0, 1] -> mean 0.5 -> [0.5, -0.5, -0.5, 0.5]."""
    assert advantages_or_skip([1.0, 1.0, 1.0], normalize_std=False) is None
    assert advantages_or_skip([0.0, 0.0], normalize_std=True) is None
    assert advantages_or_skip([1.0, 0.0, 0.0, 1.0], normalize_std=False) == [0.5, -0.5, -0.5, 0.5]


def test_skip_warning_when_most_groups_of_the_window_were_skipped():
    """Window 3, 4 groups a step. Steps skip 3, 3, 3 groups: 9/12, exactly 3/4, no
    warning. Then 4: the last three steps skip 10/12 (8 at reward 0, 2 at 1) -> a
    warning naming the settings. The next two steps (4, 4) are inside the same window:
    silent; the third warns again."""
    rl = RLConfig(temperature=1.0, top_k=-1, group_size=4)
    skipped = SkippedGroups(window=3)
    assert [skipped.add([0.0, 0.0, 1.0], 4, rl) for _ in range(3)] == [None, None, None]
    warning = skipped.add([0.0] * 4, 4, rl)
    assert warning is not None
    assert "10/12 groups of the last 3 steps were skipped" in warning
    assert "8 at 0, 2 at 1" in warning  # which way to go: they mostly fail
    assert "rl.temperature, now 1," in warning and "rl.top_k, now all" in warning
    assert "rl.group_size (now 4)" in warning
    assert skipped.add([0.0] * 4, 4, rl) is None
    assert skipped.add([0.0] * 4, 4, rl) is None
    assert skipped.add([0.0] * 4, 4, rl) is not None


def write_prompts(path: Path, metadata: list[dict]) -> None:
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png_data_url(32, 32, seed=i)}},
                        {"type": "text", "text": "What digit is this?"},
                    ],
                }
            ],
            "metadata": m,
        }
        for i, m in enumerate(metadata)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def job_toml(tmp_path: Path, rl: str, validation: bool = True) -> Path:
    toml = tmp_path / "rl.toml"
    val = 'validation_data = "val.jsonl"' if validation else ""
    toml.write_text(
        f"""
[algorithm]
type = "online"
method = "rl"
variety = "lora"
[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"
{val}
[hyperparameters]
n_epochs = 2
learning_rate = 1e-3
sequence_length = 128
eval_max_new_tokens = 2
[lora]
r = 4
[model]
min_pixels = 4096
max_pixels = 4096
[rl]
{rl}
"""
    )
    return toml


def train(toml: Path, out: Path):
    return runner.invoke(
        app, ["train", "--type", "rl", "--config", str(toml), "--output", str(out)]
    )


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_rl_cli_run_with_file_reward_errors_skips_and_kl(tmp_path):
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "digits.py").write_text(REWARD_FILE)
    write_prompts(tmp_path / "train.jsonl", [{"boom": True}, {"const": True}, {}, {}])
    write_prompts(tmp_path / "val.jsonl", [{"answer": "3"}, {"answer": "5"}])
    toml = job_toml(
        tmp_path,
        'reward = "rewards/digits.py:alternating"\ngroup_size = 4\nprompts_per_step = 4\n'
        'max_tokens = 3\nloss = "ppo"\nkl_coef = 0.1',
    )
    run = tmp_path / "run"
    result = train(toml, run)
    assert result.exit_code == 0, result.output
    assert "reward error (scored 0) on line 1: ValueError: reward exploded" in result.output
    # RL never reads gradient_accumulation_steps: no vision default is printed for it
    assert "gradient_accumulation_steps" not in result.output
    assert "were skipped" not in result.output  # half the groups skipped: not most
    steps = [r for r in records(run) if "reward_mean" in r]
    assert len(steps) == 2
    for r in steps:
        for key in (
            "loss",
            "reward_mean",
            "reward_max",
            "frac_groups_skipped",
            "completion_len_mean",
            "sampler_logprob_mean",
            "grad_norm",
        ):
            assert key in r, key
        assert r["reward_errors"] == 4  # the boom row's whole group, scored 0
        # boom (all 0) and const (all 0.5) groups are skipped; alternating ones train
        assert r["frac_groups_skipped"] == 0.5
        assert r["kl"] >= 0 and r["trained_tokens"] > 0 and r["grad_norm"] > 0
    evals = [r for r in records(run) if "eval/accuracy" in r]
    assert evals and evals[-1]["eval/n"] == 2 and "eval/reward" in evals[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reward_errors"] == 8
    assert (run / "final" / "adapter_config.json").exists()
    # the saved config names the reward file absolutely, so it runs from anywhere
    assert str(tmp_path / "rewards" / "digits.py") in (run / "config.toml").read_text()


def test_all_equal_rewards_skip_the_update(tmp_path, monkeypatch):
    (tmp_path / "const_reward_mod.py").write_text("def one(completion, row):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    write_prompts(tmp_path / "train.jsonl", [{}, {}])
    toml = job_toml(
        tmp_path,
        'reward = "const_reward_mod:one"\ngroup_size = 2\nprompts_per_step = 2\nmax_tokens = 1',
        validation=False,
    )
    run = tmp_path / "run"
    result = train(toml, run)
    assert result.exit_code == 0, result.output
    (step,) = [r for r in records(run) if "reward_mean" in r][:1]
    assert step["frac_groups_skipped"] == 1.0
    assert "step 2: 4/4 groups of the last 2 steps were skipped" in result.output
    assert step["grad_norm"] == 0.0 and step["trained_tokens"] == 0
    assert (run / "final").is_dir()


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("exact", "not a built-in reward"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("missing.py:f", "does not exist"),
        ("regex_match", "reward_regex"),
    ],
)
def test_unresolvable_reward_is_a_config_error_before_any_work(tmp_path, reward, message):
    write_prompts(tmp_path / "train.jsonl", [{}])
    run = tmp_path / "run"
    result = train(job_toml(tmp_path, f'reward = "{reward}"', validation=False), run)
    assert result.exit_code == 2  # refused with the config error, no traceback
    assert "rl.reward" in result.output and message in result.output
    assert not run.exists()
