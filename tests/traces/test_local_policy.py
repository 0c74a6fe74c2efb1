"""A local model as the policy: concurrent episodes' prompts are sampled in one batch."""

from __future__ import annotations

from vlmtune.tasks.episodes import LocalTaskClient
from vlmtune.traces.collect import CollectConfig, collect
from vlmtune.traces.local import LocalModelPolicy
from vlmtune.traces.store import TraceStore


def test_tiny_model_plays_lamp_in_batches_and_invalid_answers_are_counted(tmp_path):
    # The tiny model has random weights: its answers are noise, mostly naming no button.
    policy = LocalModelPolicy("tiny-qwen3-vl", max_tokens=4, max_batch=4, gather_s=5.0)
    try:
        with TraceStore(tmp_path / "t.db") as store:
            summary = collect(
                LocalTaskClient("lamp"), policy, store, CollectConfig(episodes=4, concurrency=4)
            )
            steps = [s for r in store.rollouts() for s in store.steps(r.id)]
    finally:
        policy.close()
    assert policy.batches == [4]  # four episodes, one sampling call
    assert (summary.errors, summary.steps) == (0, 4)
    assert all(s.completion is not None for s in steps)
    valid = sum(s.valid_action for s in steps)
    assert summary.valid_action_share == valid / 4
    assert all(s.action is None for s in steps if not s.valid_action)  # lamp: no fallback
