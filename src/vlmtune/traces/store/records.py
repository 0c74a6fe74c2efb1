"""What the trace store holds and hands back: a rollout, a step, and its one error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmtune.traces.prompts import Messages


class TraceStoreError(Exception):
    """The store cannot be opened or written; the message names the file."""


@dataclass(frozen=True)
class Rollout:
    """One episode. ``ended`` is None while it runs (or if its collector died)."""

    id: str
    task: str
    split: str
    seed: int
    policy: str
    model: str | None
    image_only: bool
    started: float
    ended: float | None = None
    episode_return: float | None = None
    steps: int = 0
    success: bool | None = None  # None: the task has no success threshold, or an error
    achievements: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class Step:
    """One decision: the prompt the policy saw, what it answered, what the task made of it."""

    rollout_id: str
    index: int
    prompt: Messages
    completion: str | None  # the policy's text (None: it chose an action directly)
    action: str | None  # the action taken (None: the completion named none)
    valid_action: bool
    reward: float
    done: bool
    expert_action: str | None = None  # the task's expert at this observation
    info: dict[str, Any] = field(default_factory=dict)
    prompt_hash: str = ""  # equal prompts (images included) have equal hashes
