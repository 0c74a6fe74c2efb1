"""A small deterministic task for the episode layer's tests (no image work)."""

from __future__ import annotations

from typing import ClassVar

from vlmtune.tasks.common import one_action
from vlmtune.tasks.protocol import Messages, StepOutcome, TaskInfo


class WalkTask:
    """Walk right from 0 to 3 (terminal, reward 1 per step right); ``noop`` on nonsense;
    truncated after 5 steps. The expert alternates right/left by observation, so the
    tests can tell which observation an expert action belongs to."""

    info: ClassVar[TaskInfo] = TaskInfo(
        name="walk",
        description="walk right",
        actions=["left", "right", "noop"],
        max_steps=5,
        splits=["train"],
        image_size=[1, 1],
        has_expert=True,
        invalid_action="noop",
        achievements=["arrived"],
    )

    def __init__(self) -> None:
        self.pos = 0
        self.observation = 0  # how many observations this episode has shown
        self.expert_calls: list[int] = []

    def reset(self, seed: int, split: str) -> None:
        self.pos, self.observation = seed % 2, 0

    def prompt(self, image_only: bool) -> Messages:
        return [{"role": "user", "content": f"obs {self.observation} at {self.pos}"}]

    def parse(self, completion: str) -> str | None:
        return one_action(completion, self.info.actions)

    def step(self, action: str) -> StepOutcome:
        self.pos += {"left": -1, "right": 1, "noop": 0}[action]
        self.observation += 1
        arrived = self.pos >= 3
        return StepOutcome(
            reward=1.0 if action == "right" else 0.0,
            done=arrived,
            achievements=["arrived"] if arrived else [],
        )

    def expert(self) -> str | None:
        self.expert_calls.append(self.observation)
        return "right" if self.observation % 2 == 0 else "left"


class NoFallbackWalk(WalkTask):
    """The same walk, but a completion naming no action ends the episode."""

    info: ClassVar[TaskInfo] = WalkTask.info.model_copy(update={"invalid_action": None})
