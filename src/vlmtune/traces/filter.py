"""Traces -> JSONL rows in vlmtune's data format: SFT, preference pairs or RL prompts.

The prompt of every row is the stored prompt exactly as the task sent it (system turn,
image-only turns and data URLs included); only an assistant turn is appended. Each row
goes through the data layer's own ``RowParser`` (what ``vlmtune data validate`` and
training read with) before it is kept, and every step that does not become a row is
counted under a reason. An empty answer is never a row: it is dropped as "empty
assistant target".

Rows are split into train and validation by episode: every row of an episode lands on
one side (a preference pair made from two episodes ties them to the same side), and a
row identical to one already written (same prompt, same answer) is dropped as a
duplicate wherever it falls, so no example sits on both sides.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vlmtune.data.errors import RowError
from vlmtune.data.refs import RefContext
from vlmtune.data.rows import RowParser
from vlmtune.traces.store import Rollout, Step, TraceStore

EMPTY_TARGET = "empty assistant target"


class FilterOptions(BaseModel):
    """Which traces become rows, and how."""

    model_config = ConfigDict(extra="forbid")

    to: Literal["sft", "preference", "rl"] = Field(description="the row kind to write")
    relabel: Literal["none", "expert"] = Field(
        default="none", description="sft: answer with the expert's action (DAgger)"
    )
    pairs: Literal["return", "expert"] = Field(
        default="return",
        description="preference: 'return' pairs answers on one observation by return-to-go; "
        "'expert' pairs the expert's action (chosen) with the policy's other one",
    )
    min_return: float | None = Field(default=None, description="keep episodes returning >= this")
    min_achievements: int | None = Field(
        default=None, ge=0, description="keep episodes with at least this many achievements"
    )
    success_only: bool = Field(default=False, description="keep successful episodes only")
    policies: list[str] = Field(default=[], description="keep these policies (empty: all)")
    splits: list[str] = Field(default=[], description="keep these task splits (empty: all)")
    tasks: list[str] = Field(default=[], description="keep these tasks (empty: all)")
    valid_only: bool = Field(default=False, description="keep steps whose action was valid")
    dedupe: bool = Field(default=True, description="drop rows identical to one already kept")
    validation_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="share of episodes held out for validation"
    )
    seed: int = Field(default=0, description="seeds the train/validation split")


@dataclass
class FilterReport:
    """What was read, written, and dropped (episodes and rows, each with its reason)."""

    to: str
    episodes: int = 0
    steps: int = 0
    train_rows: int = 0
    validation_rows: int = 0
    train_episodes: int = 0
    validation_episodes: int = 0
    episodes_dropped: Counter[str] = field(default_factory=Counter)
    rows_dropped: Counter[str] = field(default_factory=Counter)  # steps, or pairs

    def to_dict(self) -> dict[str, Any]:
        return {
            "to": self.to,
            "episodes": self.episodes,
            "steps": self.steps,
            "train_rows": self.train_rows,
            "validation_rows": self.validation_rows,
            "train_episodes": self.train_episodes,
            "validation_episodes": self.validation_episodes,
            "episodes_dropped": dict(self.episodes_dropped.most_common()),
            "rows_dropped": dict(self.rows_dropped.most_common()),
        }

    def text(self) -> str:
        lines = [
            f"read {self.episodes} episodes, {self.steps} steps; wrote {self.train_rows} "
            f"{self.to} rows ({self.train_episodes} episodes)"
            + (
                f" and {self.validation_rows} validation rows ({self.validation_episodes} episodes)"
                if self.validation_rows or self.validation_episodes
                else ""
            )
        ]
        for title, counts in (
            ("episodes dropped", self.episodes_dropped),
            ("rows dropped", self.rows_dropped),
        ):
            if counts:
                lines.append(f"{title}:")
                lines += [f"  {n:>7,}  {reason}" for reason, n in counts.most_common()]
        return "\n".join(lines)


@dataclass
class FilterResult:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    report: FilterReport


@dataclass(frozen=True)
class _Candidate:
    """A row being made, with the episodes it comes from and its duplicate key."""

    row: dict[str, Any]
    rollouts: tuple[str, ...]
    key: tuple[str, ...]


def _episode_reason(rollout: Rollout, options: FilterOptions) -> str | None:
    """Why an episode is left out, or None to keep it."""
    if rollout.ended is None:
        return "episode never finished (its collector stopped)"
    if rollout.error is not None:
        return "episode ended in an error"
    if options.tasks and rollout.task not in options.tasks:
        return "task not selected (--task)"
    if options.policies and rollout.policy not in options.policies:
        return "policy not selected (--policy)"
    if options.splits and rollout.split not in options.splits:
        return "split not selected (--split)"
    if options.success_only and not rollout.success:
        return "not a success (--success-only)"
    if options.min_return is not None and (rollout.episode_return or 0.0) < options.min_return:
        return f"return below {options.min_return:g} (--min-return)"
    if (
        options.min_achievements is not None
        and len(rollout.achievements) < options.min_achievements
    ):
        return f"fewer than {options.min_achievements} achievements (--min-achievements)"
    return None


def _answer(step: Step) -> str | None:
    """What the policy said: its text, or the action it chose directly."""
    return step.completion if step.completion is not None else step.action


def _empty(text: str | None) -> bool:
    return text is None or not text.strip()


def _metadata(rollout: Rollout, step: Step, return_to_go: float) -> dict[str, Any]:
    return {
        "task": rollout.task,
        "split": rollout.split,
        "seed": rollout.seed,
        "step": step.index,
        "rollout": rollout.id,
        "policy": rollout.policy,
        "image_only": rollout.image_only,
        "return": rollout.episode_return,
        "return_to_go": return_to_go,
        "action": step.action,
        "expert_action": step.expert_action,
    }


def _with_answer(prompt: list[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
    return [*prompt, {"role": "assistant", "content": answer}]


def _returns_to_go(steps: list[Step]) -> list[float]:
    out, total = [], 0.0
    for step in reversed(steps):
        total += step.reward
        out.append(total)
    return out[::-1]


Selected = list[tuple[Rollout, Step, float]]  # (episode, step, return-to-go)


def _sft(selected: Selected, options: FilterOptions, dropped: Counter[str]) -> list[_Candidate]:
    out = []
    for rollout, step, rtg in selected:
        if options.relabel == "expert":
            if step.expert_action is None:
                dropped["no expert action at this step (--relabel expert)"] += 1
                continue
            answer: str | None = step.expert_action
        else:
            answer = _answer(step)
        if _empty(answer):
            dropped[EMPTY_TARGET] += 1
            continue
        assert answer is not None
        row = {
            "messages": _with_answer(step.prompt, answer),
            "metadata": _metadata(rollout, step, rtg),
        }
        out.append(_Candidate(row, (rollout.id,), (step.prompt_hash, answer)))
    return out


def _rl(selected: Selected, task_actions: dict[str, list[str]]) -> list[_Candidate]:
    out = []
    for rollout, step, rtg in selected:
        metadata = _metadata(rollout, step, rtg)
        metadata["actions"] = task_actions.get(rollout.task, [])
        if step.expert_action is not None:
            metadata["answer"] = step.expert_action  # what exact_match scores against
        row = {"messages": step.prompt, "metadata": metadata}
        out.append(_Candidate(row, (rollout.id,), (step.prompt_hash,)))
    return out


def _pair(
    chosen: tuple[Rollout, Step, float],
    rejected: tuple[Rollout, Step, float],
    chosen_answer: str,
    rejected_answer: str,
) -> _Candidate:
    (rollout, step, rtg), (other, other_step, other_rtg) = chosen, rejected
    metadata = _metadata(rollout, step, rtg)
    metadata.update(
        rejected_rollout=other.id, rejected_step=other_step.index, rejected_return_to_go=other_rtg
    )
    row = {
        "chosen": {"messages": _with_answer(step.prompt, chosen_answer)},
        "rejected": {"messages": _with_answer(step.prompt, rejected_answer)},
        "metadata": metadata,
    }
    return _Candidate(
        row,
        tuple(sorted({rollout.id, other.id})),
        (step.prompt_hash, chosen_answer, rejected_answer),
    )


def _expert_pairs(selected: Selected, dropped: Counter[str]) -> list[_Candidate]:
    out = []
    for item in selected:
        step = item[1]
        if step.expert_action is None:
            dropped["no expert action at this step"] += 1
        elif step.action == step.expert_action:
            dropped["the policy played the expert's action (no pair)"] += 1
        elif _empty(step.expert_action) or _empty(_answer(step)):
            dropped[EMPTY_TARGET] += 1
        else:
            out.append(_pair(item, item, step.expert_action, _answer(step) or ""))
    return out


def _return_pairs(selected: Selected, dropped: Counter[str]) -> list[_Candidate]:
    """On each observation (same task, same prompt), the answer with the best mean
    return-to-go is chosen over every answer with a lower one."""
    groups: dict[tuple[str, str], list[tuple[Rollout, Step, float]]] = defaultdict(list)
    for item in selected:
        groups[(item[0].task, item[1].prompt_hash)].append(item)
    out = []
    for items in groups.values():
        by_answer: dict[str, list[tuple[Rollout, Step, float]]] = defaultdict(list)
        for item in items:
            answer = _answer(item[1])
            if _empty(answer):
                dropped[EMPTY_TARGET] += 1
                continue
            assert answer is not None
            by_answer[answer].append(item)
        means = {a: sum(i[2] for i in group) / len(group) for a, group in by_answer.items()}
        best = max(means, key=lambda a: (means[a], a), default=None)
        worse = [a for a in means if best is not None and means[a] < means[best]]
        if not worse:
            dropped["no answer with a different return on this observation"] += sum(
                len(g) for g in by_answer.values()
            )
            continue
        assert best is not None
        for answer in sorted(worse):
            out.append(_pair(by_answer[best][0], by_answer[answer][0], best, answer))
    return out


def _validation_units(candidates: list[_Candidate], fraction: float, seed: int) -> set[str]:
    """The episodes held out: whole groups of episodes that share a row, ``fraction`` of them."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for c in candidates:
        for other in c.rollouts[1:]:
            parent[find(other)] = find(c.rollouts[0])
        find(c.rollouts[0])
    groups: dict[str, list[str]] = defaultdict(list)
    for rollout_id in parent:
        groups[find(rollout_id)].append(rollout_id)
    units = sorted(sorted(g) for g in groups.values())
    if fraction <= 0 or len(units) < 2:
        return set()
    random.Random(seed).shuffle(units)
    n = min(len(units) - 1, max(1, round(fraction * len(units))))
    return {r for unit in units[:n] for r in unit}


def _check(row: dict[str, Any], parser: RowParser, line: int) -> str | None:
    """The loader's reason for refusing ``row``, or None when it reads it."""
    try:
        # As written and read back: what the loader sees is the JSON text, not this dict.
        parser.parse(json.loads(json.dumps(row, ensure_ascii=False)), line)
    except RowError as exc:
        return f"refused by the row loader: {exc.category}"
    return None


def filter_traces(store: TraceStore, options: FilterOptions, output_dir: Path) -> FilterResult:
    """Select, build, check and split rows; nothing is written (see ``write_rows``).

    ``output_dir`` is where the rows will live: the loader checks them as read from there.
    """
    report = FilterReport(to=options.to)
    task_actions = {name: info.get("actions", []) for name, info in store.tasks().items()}
    selected: Selected = []
    for rollout, steps in store.iter_steps():
        report.episodes += 1
        report.steps += len(steps)
        reason = _episode_reason(rollout, options)
        if reason is not None:
            report.episodes_dropped[reason] += 1
            continue
        for step, rtg in zip(steps, _returns_to_go(steps), strict=True):
            if options.valid_only and not step.valid_action:
                report.rows_dropped["invalid action (--valid-only)"] += 1
                continue
            selected.append((rollout, step, rtg))
    dropped = report.rows_dropped
    if options.to == "sft":
        candidates = _sft(selected, options, dropped)
    elif options.to == "rl":
        candidates = _rl(selected, task_actions)
    elif options.pairs == "expert":
        candidates = _expert_pairs(selected, dropped)
    else:
        candidates = _return_pairs(selected, dropped)

    held_out = _validation_units(candidates, options.validation_fraction, options.seed)
    parser = RowParser(options.to, RefContext(output_dir.resolve()), max_images_per_message=None)
    train: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    sides: dict[str, set[str]] = {"train": set(), "validation": set()}
    for c in candidates:
        if options.dedupe and c.key in seen:
            dropped["duplicate of a row already kept (same prompt and answer)"] += 1
            continue
        side = "validation" if c.rollouts[0] in held_out else "train"
        rows = validation if side == "validation" else train
        refusal = _check(c.row, parser, len(rows) + 1)
        if refusal is not None:
            dropped[refusal] += 1
            continue
        seen.add(c.key)
        rows.append(c.row)
        sides[side].update(c.rollouts)
    report.train_rows, report.validation_rows = len(train), len(validation)
    report.train_episodes = len(sides["train"])
    report.validation_episodes = len(sides["validation"])
    return FilterResult(train, validation, report)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line, written atomically (a reader never sees half a file)."""
    from vlmtune.atomic import atomic_write

    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
