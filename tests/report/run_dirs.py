"""Run directories built by hand, in the shapes the recipes write (``recipes/sft.py``,
``dpo.py``, ``rl.py``, ``eval_records.py``): the report's tests read them without
training anything."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tests.conftest import png_bytes


def step_record(method: str, step: int, total: int) -> dict[str, Any]:
    """One optimizer step's metrics.jsonl record, as the recipe of ``method`` writes it."""
    t = step / total
    common = {"step": step, "total_steps": total, "learning_rate": 1e-3 * (1 - t),
              "grad_norm": 5.0 * math.exp(-2 * t) + 0.1 * (step % 3)}  # fmt: skip
    if method == "sft":
        return {**common, "loss": 3.0 * math.exp(-4 * t) + 0.05 * (step % 2),
                "weighted_tokens": 20, "tokens_per_s": 2000.0 + step,
                "examples_per_s": 20.0 + step % 5, "packing_efficiency": 0.63}  # fmt: skip
    if method == "dpo":
        return {**common, "loss": 0.69 - 0.3 * t, "dpo_loss": 0.69 - 0.3 * t,
                "reward_accuracy": min(1.0, 0.5 + t), "reward_ties": 0.0,
                "reward_margin": 2 * t, "chosen_reward": 0.1 * t, "rejected_reward": -t,
                "chosen_logratio": t, "rejected_logratio": -10 * t,
                "pairs_per_s": 12.0}  # fmt: skip
    rewards = sorted([0.0, 0.0, t, 1.0] if step % 2 else [0.0, t, t, 1.0])
    return {**common, "loss": 0.001, "reward_mean": sum(rewards) / 4,
            "reward_min": rewards[0], "reward_p25": rewards[1] * 0.75,
            "reward_median": (rewards[1] + rewards[2]) / 2, "reward_p75": rewards[2],
            "reward_max": rewards[3], "frac_groups_skipped": 0.5 - 0.3 * t,
            "completion_len_mean": 3.0, "frac_truncated": 0.0, "sampler_logprob_mean": -0.5,
            "reward_errors": 0, "trained_tokens": 40, "sample_s": 0.5, "step_s": 1.0}  # fmt: skip


def eval_record(method: str, step: int, total: int) -> dict[str, Any]:
    t = step / total
    if method == "sft":
        return {"step": step, "total_steps": total, "eval/loss": 2.0 - t,
                "eval/accuracy": 0.3 + 0.5 * t, "eval/n": 4}  # fmt: skip
    if method == "dpo":
        return {"step": step, "total_steps": total, "eval/dpo_loss": 0.69 - 0.2 * t,
                "eval/reward_accuracy": 0.5 + 0.4 * t, "eval/accuracy": 0.5, "eval/n": 4}  # fmt: skip
    return {"step": step, "total_steps": total, "eval/reward": 0.5 * t,
            "eval/accuracy": 0.5 * t, "eval/n": 4}  # fmt: skip


def predictions(run: Path, step: int, right: int, wrong: int) -> list[dict[str, Any]]:
    """``evals/step-<step>.jsonl`` with ``right`` right and ``wrong`` wrong answers, each
    with one image under ``evals/images``."""
    (run / "evals" / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(right + wrong):
        line = i + 1
        name = f"evals/images/line-{line}-0.png"
        (run / name).write_bytes(png_bytes(32, 32, seed=i))
        answer = str(i % 10)
        prediction = answer if i < right else str((i + 1) % 10)
        records.append({"line": line, "prompt": "What digit is this?", "images": [name],
                        "prediction": prediction, "answer": answer,
                        "correct": i < right})  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in records)
    (run / "evals" / f"step-{step}.jsonl").write_text(text)
    return records


def make_run(
    run: Path,
    method: str = "sft",
    steps: int = 40,
    eval_every: int = 10,
    finished: bool = True,
    right: int = 3,
    wrong: int = 2,
) -> Path:
    """A whole run directory of ``method``: config, data report with drops, applied
    settings, metrics with evals, predictions of the last eval, summary if finished."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(
        f'[algorithm]\nmethod = "{method}"\n\n[job]\nmodel = "tiny-qwen3-vl"\n'
        f'data = "train.jsonl"\nname = "{method}-run"\n'
    )
    kind = {"sft": "sft", "dpo": "preference", "rl": "rl"}[method]
    dropped = [{"line": 3, "reason": "not valid JSON"},
               {"line": 9, "reason": "too long: 300 tokens > sequence_length 256"},
               {"line": 12, "reason": "too long: 410 tokens > sequence_length 256"}]  # fmt: skip
    report = {"train": {"path": "train.jsonl", "kind": kind, "total": 20, "valid": 17,
                        "images": 17, "images_dropped": 2, "dropped": dropped, "warnings": []},
              "validation": {"path": "val.jsonl", "kind": kind, "total": 5, "valid": 5,
                             "images": 5, "images_dropped": 0, "dropped": [],
                             "warnings": []}}  # fmt: skip
    (run / "validation_report.json").write_text(json.dumps(report))
    settings = {"method": method, "ignored_keys": ["warmupSteps: not used (a reason)"],
                "vision_defaults": [{"key": "training.precision", "old": "auto", "new": "fp32",
                                     "reason": "no bf16 on this cpu: fp32"}],
                "job_file": []}  # fmt: skip
    (run / "applied_settings.json").write_text(json.dumps(settings))
    lines = []
    for step in range(1, steps + 1):
        lines.append(step_record(method, step, steps))
        if step % eval_every == 0 and (step < steps or finished):
            lines.append(eval_record(method, step, steps))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    last_eval = (steps if finished else steps - steps % eval_every) or eval_every
    predictions(run, last_eval, right, wrong)
    if finished:
        summary = {"steps": steps, "final_dir": str(run / "final"), "wall_s": 75.0,
                   **{k: v for k, v in eval_record(method, steps, steps).items()
                      if k.startswith("eval/")}}  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
    return run
