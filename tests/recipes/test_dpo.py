"""DPO recipe: the loss on hand-built log-probs, shared image tensors, and a CLI run that learns."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import png_data_url
from vlmtune.cli import app
from vlmtune.config import DPOConfig
from vlmtune.data import load_dataset
from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.recipes.dpo import make_loss_fn, render_pairs, response_logps
from vlmtune.render_rows import RenderLimits
from vlmtune.types import Datum, ImageChunk, ModelInput, TensorData

runner = CliRunner()


def pref_row(seed: int, chosen: str, rejected: str) -> dict:
    prompt = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(32, 32, seed=seed)}},
                {"type": "text", "text": "What digit is this?"},
            ],
        }
    ]
    return {
        "chosen": {"messages": [*prompt, {"role": "assistant", "content": chosen}]},
        "rejected": {"messages": [*prompt, {"role": "assistant", "content": rejected}]},
    }


def write_pairs(path: Path, n: int) -> None:
    # two distinct pairs, repeated: small enough to fit in a few steps
    rows = [pref_row(i % 2, str(i % 2), str(7 - i % 2)) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_datum(weights: list[float]) -> Datum:
    n = len(weights)
    return Datum(
        model_input=ModelInput.from_ints(list(range(n))),
        loss_fn_inputs={
            "target_tokens": TensorData(data=[1] * n, dtype="int64"),
            "weights": TensorData(data=weights, dtype="float32"),
        },
    )


def test_recipe_loss_sums_response_tokens_and_matches_hand_value():
    """One pair. Chosen weights [0, 1, 1], logprobs [-5, -1, -2]: response logp = -3
    (the prompt's -5 is ignored). Rejected weights [0, 0, 1], logprobs [-9, -9, -4]: -4.
    Reference: chosen -4, rejected -3. beta = 0.5:
    h = 0.5 * ((-3 - -4) - (-4 - -3)) = 0.5 * (1 + 1) = 1.0,
    loss = -log sigmoid(1) = log(1 + e^-1) = 0.313262; chosen reward 0.5, rejected -0.5."""
    datums = [fake_datum([0, 1, 1]), fake_datum([0, 0, 1])]
    logprobs = [
        torch.tensor([-5.0, -1.0, -2.0], requires_grad=True),
        torch.tensor([-9.0, -9.0, -4.0], requires_grad=True),
    ]
    assert response_logps(datums, logprobs).tolist() == [-3.0, -4.0]
    loss_fn = make_loss_fn(torch.tensor([[-4.0, -3.0]]), DPOConfig(beta=0.5))
    loss, m = loss_fn(datums, logprobs)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert m["reward_accuracy"] == 1.0
    assert m["chosen_reward"] == pytest.approx(0.5)
    assert m["rejected_reward"] == pytest.approx(-0.5)
    loss.backward()  # gradient reaches the response tokens only
    assert logprobs[0].grad[0].item() == 0.0 and logprobs[0].grad[1].item() < 0


def test_chosen_and_rejected_see_the_same_image_tensors(tmp_path, tiny_dir):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pref_row(3, "3", "8")) + "\n")
    engine = TrainingEngine(
        EngineConfig(base_model=str(tiny_dir), mode="full", min_pixels=4096, max_pixels=4096)
    )
    rows, report = load_dataset(path, "preference")
    (pair,), (kept,) = render_pairs(rows, engine.renderer, RenderLimits(256), report)
    assert kept is rows[0] and report.valid == 1 and not report.dropped
    chosen, rejected = pair
    (img_c,) = [c for c in chosen.model_input.chunks if isinstance(c, ImageChunk)]
    (img_r,) = [c for c in rejected.model_input.chunks if isinstance(c, ImageChunk)]
    assert img_c.data == img_r.data and img_c.expected_tokens == img_r.expected_tokens
    batch_c, batch_r = engine.collate([chosen]), engine.collate([rejected])
    assert torch.equal(batch_c.pixel_values, batch_r.pixel_values)
    assert torch.equal(batch_c.image_grid_thw, batch_r.image_grid_thw)
    # ...and in one batch, each sequence gets its own copy of the same image
    both = engine.collate([chosen, rejected])
    half = both.pixel_values.shape[0] // 2
    assert torch.equal(both.pixel_values[:half], both.pixel_values[half:])
    # the sides differ only in the response: the weights mark exactly that
    ids_c = chosen.model_input.to_ints(engine.image_token_id)
    ids_r = rejected.model_input.to_ints(engine.image_token_id)
    prompt_len = next(i for i, w in enumerate(chosen.loss_fn_inputs["weights"].data) if w > 0)
    assert ids_c[: prompt_len + 1] == ids_r[: prompt_len + 1]


def write_dpo_job(tmp_path: Path) -> Path:
    write_pairs(tmp_path / "train.jsonl", 4)
    write_pairs(tmp_path / "val.jsonl", 2)
    toml = tmp_path / "dpo.toml"
    toml.write_text(
        """
[algorithm]
method = "dpo"
variety = "lora"
[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"
validation_data = "val.jsonl"
[hyperparameters]
n_epochs = 2
learning_rate = 5e-3
lr_scheduler = "constant"
sequence_length = 128
save_every = 1
eval_max_new_tokens = 2
[dpo]
beta = 0.5
[lora]
r = 4
[model]
min_pixels = 4096
max_pixels = 4096
"""
    )
    return toml


def test_dpo_cli_run_learns_a_repeated_pair_and_resumes(tmp_path):
    toml = write_dpo_job(tmp_path)
    run = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "--type", "dpo", "--config", str(toml), "--output", str(run)]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "dpo_loss" in r]
    assert len(steps) == 2  # 4 pairs per step (fewer rows than the batch), 2 epochs
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        assert key in steps[0]
    assert "chosen_logratio" in steps[0] and "rejected_logratio" in steps[0]
    # Step 1 runs on the reference weights: the cached reference log-probs must equal the
    # policy's, so the margin is 0 and the loss log 2.
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    # ... and every pair a tie within float noise: chance, not the sign of that noise
    assert steps[0]["reward_ties"] == 1.0 and steps[0]["reward_accuracy"] == 0.5
    assert steps[-1]["dpo_loss"] < steps[0]["dpo_loss"] - 0.1
    assert steps[-1]["reward_accuracy"] == 1.0
    evals = [r for r in records if "eval/dpo_loss" in r]
    assert evals and "eval/accuracy" in evals[-1]
    assert (run / "final" / "adapter_config.json").exists()
    assert (run / "reference_logps.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pairs"] == 4 and summary["eval/reward_accuracy"] == 1.0

    # Interrupted after step 1: the resumed run reads the reference cache and the
    # checkpoint, and step 2 comes out the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints", resumed / "checkpoints")
    shutil.copy(run / "reference_logps.json", resumed / "reference_logps.json")
    (resumed / "metrics.jsonl").write_text(json.dumps(steps[0]) + "\n")
    args = ["train", "--type", "dpo", "--config", str(toml), "--output", str(resumed)]
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    again = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    again = [r for r in again if "dpo_loss" in r]
    assert [r["step"] for r in again] == [1, 2]
    assert again[1]["dpo_loss"] == pytest.approx(steps[1]["dpo_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_dpo_on_two_processes_equals_one(tmp_path):
    """Pairs split over two ranks (FSDP2, gloo): the reference pass up front, the coupled
    loss and the step give the one-process numbers."""
    toml = write_dpo_job(tmp_path)
    base = ["train", "--type", "dpo", "--config", str(toml), "--output"]
    losses = {}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        result = runner.invoke(app, [*base, str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        records = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(x)["dpo_loss"] for x in records if '"dpo_loss"' in x]
    assert len(losses["two"]) == 2
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-4)
