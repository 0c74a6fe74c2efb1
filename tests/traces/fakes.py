"""A small fake task and scripted policies with known numbers, for the trace tests."""

from __future__ import annotations

import random
import threading
from typing import ClassVar

from tests.conftest import png_data_url
from vlmtune.tasks.protocol import Messages, StepOutcome, TaskInfo
from vlmtune.traces.policies import Decision, Observation, PolicyError

FAIL_SEED = 3  # reset raises for this seed
SYSTEM = "You press a or b. Answer with one letter."


def fake_prompt(seed: int, step: int, image_only: bool) -> Messages:
    user: list[dict[str, object]] = [
        {"type": "image_url", "image_url": {"url": png_data_url(8, 8, seed=seed * 10 + step)}}
    ]
    if not image_only:
        user.append({"type": "text", "text": f"step {step}: a or b?"})
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


class CounterTask:
    """Three steps; "a" pays 1, "b" pays 0; achievements for the first and second "a"."""

    info: ClassVar[TaskInfo] = TaskInfo(
        name="counter",
        description="press a three times",
        actions=["a", "b"],
        max_steps=3,
        splits=["train", "test"],
        image_size=(8, 8),
        has_expert=True,
        success_threshold=2.0,
        achievements=["got_a", "two_a"],
        invalid_action="b",
    )

    def reset(self, seed: int, split: str) -> None:
        if seed == FAIL_SEED:
            raise RuntimeError("the environment broke")
        self.seed, self.t, self.a = seed, 0, 0

    def prompt(self, image_only: bool) -> Messages:
        return fake_prompt(self.seed, self.t, image_only)

    def parse(self, completion: str) -> str | None:
        text = completion.strip()
        return text if text in self.info.actions else None

    def step(self, action: str) -> StepOutcome:
        self.t += 1
        achievements: list[str] = []
        if action == "a":
            self.a += 1
            achievements = {1: ["got_a"], 2: ["two_a"]}.get(self.a, [])
        return StepOutcome(reward=float(action == "a"), done=self.t >= 3, achievements=achievements)

    def expert(self) -> str | None:
        return "a"


class ScriptedPolicy:
    """Completion "a" when seed + step is even, else "b"; seed 1 says "???" at step 2.

    On CounterTask, seeds 0..4 give returns 2, 1, 2, (error), 2; one invalid step in 12.
    """

    name = "scripted"
    model = None

    def __init__(
        self, barrier: threading.Barrier | None = None, fail_at: tuple[int, int] | None = None
    ):
        self.barrier = barrier
        self.fail_at = fail_at

    def act(self, observation: Observation, rng: random.Random) -> Decision:
        if self.barrier is not None and observation.step == 0:
            self.barrier.wait()  # passes only when enough episodes run at once
        if self.fail_at == (observation.seed, observation.step):
            raise PolicyError("endpoint timed out")
        if (observation.seed, observation.step) == (1, 2):
            return Decision(completion="???")
        return Decision(completion="a" if (observation.seed + observation.step) % 2 == 0 else "b")

    def close(self) -> None:
        pass
