"""One collector process writing rollouts into a shared trace store (test_store.py)."""

from __future__ import annotations

from typing import Any

from tests.traces.fakes import fake_prompt
from vlmtune.traces.store import Step, TraceStore


def write_rollouts(path: str, worker: int, rollouts: int, steps: int, go: Any) -> None:
    go.wait(60)  # every process opens and writes at the same moment
    with TraceStore(path) as store:
        for r in range(rollouts):
            rollout_id = store.start_rollout(
                task="counter", split="train", seed=worker * 1000 + r, policy=f"w{worker}",
                model=None, image_only=False,
            )  # fmt: skip
            for i in range(steps):
                # seeds shared by every worker: the same images arrive from every process
                prompt = fake_prompt(r % 5, i, image_only=False)
                store.add_step(Step(rollout_id, i, prompt, "a", "a", True, 1.0, i == steps - 1))
            store.finish_rollout(
                rollout_id, episode_return=float(steps), steps=steps, success=True,
                achievements=[], error=None,
            )  # fmt: skip
            store.flush()  # one commit per rollout, interleaved with the other processes'
