"""Which curves a run's report draws: one ``Figure`` per thing the run recorded.

Each plot is made only when the run has its data (two or more points: one eval is a
number in a table, not a curve), with a one-line caption saying what it shows. The
metric names are the recipes' (``recipes/sft.py``, ``dpo.py``, ``rl.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vlmtune.report.run_data import RunData
from vlmtune.report.svg import Band, Series, fmt, line_plot

Record = dict[str, Any]
SMOOTH_FROM = 30  # a noisy per-step series this long also gets a smoothed line


@dataclass(frozen=True)
class Figure:
    title: str
    caption: str
    svg: str


def column(records: Sequence[Record], key: str) -> tuple[list[int], list[float | None]]:
    """(steps, values) of the records that have ``key`` (a null value: None, a gap)."""
    xs, ys = [], []
    for r in records:
        if key in r and isinstance(r.get("step"), int):
            value = r[key]
            xs.append(r["step"])
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ys.append(float(value) if ok and math.isfinite(value) else None)
    return xs, ys


def has(records: Sequence[Record], key: str, at_least: int = 2) -> bool:
    return sum(1 for r in records if isinstance(r.get(key), int | float)) >= at_least


def smoothed(ys: Sequence[float | None], window: int) -> list[float | None]:
    """The trailing mean of the last ``window`` values (gaps skipped)."""
    out: list[float | None] = []
    for i in range(len(ys)):
        recent = [v for v in ys[max(0, i - window + 1) : i + 1] if v is not None]
        out.append(sum(recent) / len(recent) if recent else None)
    return out


def noisy_series(label: str, xs: list[int], ys: list[float | None]) -> list[Series]:
    """The raw line, and over it a smoothed one when the series is long."""
    if len(xs) < SMOOTH_FROM:
        return [Series(label, xs, ys)]
    window = max(5, len(xs) // 25)
    return [
        Series(label, xs, ys, color="#2563eb", width=1.2, faint=True),
        Series(f"{label} ({window}-step mean)", xs, smoothed(ys, window), color="#2563eb"),
    ]


def lines(records: Sequence[Record], keys: Sequence[tuple[str, str]], **kw: Any) -> str:
    """A plot of each ``(key, label)`` the records have; markers when points are few."""
    series = []
    for key, label in keys:
        if has(records, key, 1):
            xs, ys = column(records, key)
            series.append(Series(label, xs, ys, markers=len(xs) <= 30))
    return line_plot(series, **kw)


# -- each figure: (when the run has it) -> Figure ------------------------------------


def loss_figure(run: RunData) -> Figure | None:
    if not has(run.train, "loss") or run.method == "rl":
        return None
    captions = {
        "sft": "Training loss: mean negative log-likelihood per trained token, each optimizer step.",
        "dpo": "DPO loss, mean over each step's pairs: ln 2 (0.693) at the start, lower as "
        "the model prefers the chosen responses.",
    }
    xs, ys = column(run.train, "loss")
    svg = line_plot(noisy_series("loss", xs, ys), y_label="loss")
    return Figure("Loss", captions.get(run.method or "", "Training loss per step."), svg)


def reward_values(run: RunData) -> list[float]:
    """Every reward value the run's spreads name (min, quartiles, max of each step)."""
    keys = ("reward_min", "reward_p25", "reward_median", "reward_p75", "reward_max")
    found = {
        round(float(r[k]), 9) for r in run.train for k in keys if isinstance(r.get(k), int | float)
    }
    return sorted(found)


def reward_figure(run: RunData) -> Figure | None:
    """RL: each step's rewards as a spread (min-max, quartiles), median and mean; for
    a reward of two values (exact match: 0 or 1), the share of samples at each."""
    if not has(run.train, "reward_mean"):
        return None
    xs, mean = column(run.train, "reward_mean")
    values = reward_values(run) if has(run.train, "reward_p25") else []
    if len(values) == 2:
        return two_valued_reward_figure(run, values[0], values[1])
    series = [Series("mean", xs, mean, color="#1d4ed8")]
    bands = []
    if len(values) > 2:
        _, lo = column(run.train, "reward_min")
        _, q1 = column(run.train, "reward_p25")
        _, med = column(run.train, "reward_median")
        _, q3 = column(run.train, "reward_p75")
        _, hi = column(run.train, "reward_max")
        bands = [
            Band("min to max", xs, _filled(lo), _filled(hi), "#60a5fa", 0.18),
            Band("middle half", xs, _filled(q1), _filled(q3), "#2563eb", 0.3),
        ]
        series.append(Series("median", xs, med, color="#1e3a8a", width=1.2, dashed=True))
        caption = (
            "The rewards of each step's samples: the light band spans min to max, the "
            "dark one the middle half (25th to 75th percentile), with the median (dashed) "
            "and the mean."
        )
    else:  # one reward value throughout, or a run recorded before the spread was
        _, hi = column(run.train, "reward_max")
        series.append(Series("max", xs, hi, color="#93c5fd"))
        caption = "Mean and best reward of each step's samples."
    return Figure("Reward per step", caption, line_plot(series, bands, y_label="reward"))


def two_valued_reward_figure(run: RunData, low: float, high: float) -> Figure:
    """Shares of each step's samples at ``high`` and ``low``: the whole distribution of
    a two-valued reward (a quantile band of 0s and 1s would only jump between them)."""
    xs, mean = column(run.train, "reward_mean")
    share = [None if m is None else (m - low) / (high - low) for m in mean]
    top = [1.0] * len(xs)
    filled = _filled(share)
    bands = [
        Band(f"reward {fmt(high)}", xs, [0.0] * len(xs), filled, "#059669", 0.35),
        Band(f"reward {fmt(low)}", xs, filled, top, "#dc2626", 0.15),
    ]
    window = max(5, len(xs) // 25)
    series = [Series(f"share at {fmt(high)} ({window}-step mean)", xs, smoothed(share, window),
                     color="#065f46")]  # fmt: skip
    caption = (
        f"Each step's samples by reward. The reward takes only the values {fmt(low)} and "
        f"{fmt(high)}, so the share at each is its whole distribution (the green share is "
        "the mean reward when the values are 0 and 1)."
    )
    svg = line_plot(series, bands, y_min=0, y_max=1, percent=True, y_label="share of samples")
    return Figure("Reward per step", caption, svg)


def _share_figure(run: RunData, key: str, label: str, title: str, caption: str) -> Figure | None:
    """One per-step share (0-1) of the training records, as a percentage curve."""
    if not has(run.train, key):
        return None
    xs, ys = column(run.train, key)
    svg = line_plot(noisy_series(label, xs, ys), y_min=0, y_max=1, percent=True)
    return Figure(title, caption, svg)


def skipped_figure(run: RunData) -> Figure | None:
    return _share_figure(
        run,
        "frac_groups_skipped",
        "groups skipped",
        "Skipped groups",
        "Share of each step's prompts whose samples all got the same reward: zero "
        "advantage, nothing learned from them. Mostly skipped for long means little learning.",
    )


def dpo_rewards_figure(run: RunData) -> Figure | None:
    if not has(run.train, "chosen_reward"):
        return None
    keys = [("chosen_reward", "chosen"), ("rejected_reward", "rejected")]
    series = []
    for (key, label), color in zip(keys, ("#059669", "#dc2626"), strict=True):
        xs, ys = column(run.train, key)
        series.append(Series(label, xs, ys, color=color))
    return Figure(
        "Chosen and rejected rewards",
        "DPO's implicit rewards, beta x (log-prob under the model - under the reference), "
        "mean over each step's pairs: chosen should rise above rejected.",
        line_plot(series, y_label="implicit reward"),
    )


def reward_accuracy_figure(run: RunData) -> Figure | None:
    return _share_figure(
        run,
        "reward_accuracy",
        "reward accuracy",
        "Reward accuracy",
        "Share of each step's pairs whose chosen response the model already prefers "
        "over the rejected one, by more than the reference does.",
    )


def eval_figures(run: RunData) -> list[Figure]:
    """Held-out curves, when the run evaluated more than once."""
    out = []
    loss_keys = [("eval/loss", "eval loss"), ("eval/dpo_loss", "eval DPO loss")]
    if any(has(run.evals, k) for k, _ in loss_keys):
        out.append(Figure("Eval loss", "Loss on the validation data at each eval.",
                          lines(run.evals, loss_keys, y_label="loss")))  # fmt: skip
    score_keys = [("eval/accuracy", "exact match"), ("eval/reward_accuracy", "reward accuracy"),
                  ("eval/reward", "mean reward")]  # fmt: skip
    if any(has(run.evals, k) for k, _ in score_keys):
        out.append(Figure(
            "Eval accuracy",
            "Greedy answers to the validation prompts at each eval: exact match with the "
            "reference (case and spacing ignored)"
            + (", and the reward they get" if has(run.evals, "eval/reward") else "") + ".",
            lines(run.evals, score_keys, y_min=0, y_max=1, percent=True),
        ))  # fmt: skip
    return out


def simple(
    key_labels: Sequence[tuple[str, str]],
    title: str,
    caption: str,
    smooth: bool = True,
    **kw: Any,
) -> Callable[[RunData], Figure | None]:
    """A figure of the first ``(key, label)`` the run has (with ``smooth``: raw values
    faint under their running mean), plus any others as plain lines."""

    def figure(run: RunData) -> Figure | None:
        present = [(k, label) for k, label in key_labels if has(run.train, k)]
        if not present:
            return None
        series: list[Series] = []
        for i, (key, label) in enumerate(present):
            xs, ys = column(run.train, key)
            if smooth and i == 0 and len(present) == 1:
                series += noisy_series(label, xs, ys)
            else:
                series.append(Series(label, xs, ys))
        return Figure(title, caption, line_plot(series, **kw))

    return figure


TRAIN_FIGURES: tuple[Callable[[RunData], Figure | None], ...] = (
    loss_figure,
    reward_figure,
    skipped_figure,
    dpo_rewards_figure,
    reward_accuracy_figure,
    simple([("learning_rate", "learning rate")], "Learning rate",
           "The learning rate of each optimizer step: a job's warmup and schedule, or what "
           "a client's loop sent.",
           smooth=False, log_y=False),
    simple([("grad_norm", "gradient norm")], "Gradient norm",
           "Global L2 norm of each step's gradient, before clipping (a job's "
           "hyperparameters.max_grad_norm, a client's grad_clip_norm). Spikes come before "
           "divergence.",
           y_label="norm"),
    simple([("examples_per_s", "examples/s")], "Throughput",
           "Examples trained per second, each step.", y_label="examples/s"),
    simple([("pairs_per_s", "pairs/s")], "Throughput",
           "Preference pairs trained per second (each pair is two sequences), each step."),
    simple([("tokens_per_s", "tokens/s")], "Tokens per second",
           "Positions (prompt, answer and image tokens) processed per second, each step."),
    simple([("sample_s", "sampling"), ("step_s", "whole step")], "Seconds per step",
           "Wall time of each step (RL: and the part spent sampling the groups).",
           y_label="seconds"),
    simple([("completion_len_mean", "mean completion length")], "Completion length",
           "Mean tokens per sampled completion, each step.", y_label="tokens"),
    simple([("packing_efficiency", "packing efficiency")], "Packing efficiency",
           "Share of each packed row's positions holding real tokens, not padding "
           "(1.0: none wasted).", smooth=False, y_max=1, percent=True),
)  # fmt: skip


def train_figures(run: RunData) -> list[Figure]:
    return [f for make in TRAIN_FIGURES if (f := make(run)) is not None]


def _filled(values: Sequence[float | None]) -> list[float]:
    """A band's edge needs a number at every step: a gap becomes NaN (left out)."""
    return [math.nan if v is None else v for v in values]
