"""Collection: concurrency, one failing episode that never stops the run, the summary."""

from __future__ import annotations

import random
import threading

import pytest

from tests.traces.fakes import FAIL_SEED, CounterTask, ScriptedPolicy
from vlmtune.tasks.episodes import LocalTaskClient
from vlmtune.traces.collect import CollectConfig, collect
from vlmtune.traces.policies import (
    ExpertPolicy,
    Observation,
    PolicySpecError,
    RandomPolicy,
    chat_completions_url,
    make_policy,
)
from vlmtune.traces.store import TraceStore


@pytest.fixture
def store(tmp_path):
    with TraceStore(tmp_path / "t.db") as s:
        yield s


def test_summary_numbers_on_a_task_with_known_rewards(store):
    # Seeds 0..4: returns 2, 1, 2, error (reset raises), 2; one invalid completion in 12 steps.
    summary = collect(
        LocalTaskClient(CounterTask), ScriptedPolicy(), store, CollectConfig(episodes=5)
    )
    assert (summary.episodes, summary.errors, summary.steps) == (5, 1, 12)
    assert summary.mean_return == pytest.approx(7 / 4)
    assert summary.success_rate == pytest.approx(3 / 4)  # return >= 2
    assert summary.mean_achievements == pytest.approx(7 / 4)
    assert summary.achievement_rates == pytest.approx({"got_a": 1.0, "two_a": 3 / 4})
    assert summary.valid_action_share == pytest.approx(11 / 12)
    assert summary.frames_per_s == pytest.approx(12 / summary.wall_s)
    assert summary.error_examples == [f"seed {FAIL_SEED}: RuntimeError: the environment broke"]
    assert "success rate: 75.0%" in summary.text()

    by_seed = {r.seed: r for r in store.rollouts()}
    assert by_seed[FAIL_SEED].error == "RuntimeError: the environment broke"
    assert by_seed[FAIL_SEED].success is None and by_seed[FAIL_SEED].ended is not None
    assert [by_seed[s].episode_return for s in (0, 1, 2, 4)] == [2.0, 1.0, 2.0, 2.0]
    steps = store.steps(by_seed[1].id)
    assert [(s.completion, s.action, s.valid_action) for s in steps] == [
        ("b", "b", True), ("a", "a", True), ("???", "b", False)  # invalid: the task's "b"
    ]  # fmt: skip
    assert [s.expert_action for s in steps] == ["a", "a", "a"]
    assert steps[1].info["achievements"] == ["got_a"]


def test_episodes_run_concurrently_and_a_failing_one_is_recorded(store):
    # Four episodes must reach step 0 together to pass the barrier: only with concurrency.
    policy = ScriptedPolicy(barrier=threading.Barrier(4, timeout=10), fail_at=(5, 1))
    config = CollectConfig(episodes=4, concurrency=4, seed_start=4)  # seeds 4..7
    summary = collect(LocalTaskClient(CounterTask), policy, store, config)
    assert summary.errors == 1
    failed = next(r for r in store.rollouts() if r.error)
    assert (failed.seed, failed.error) == (5, "PolicyError: endpoint timed out")
    assert failed.steps == 1 and len(store.steps(failed.id)) == 1  # its first step is kept
    done = [r for r in store.rollouts() if not r.error]
    assert sorted((r.seed, r.steps) for r in done) == [(4, 3), (6, 3), (7, 3)]


def test_random_is_seeded_per_episode_and_expert_plays_the_expert(store):
    client = LocalTaskClient(CounterTask)
    info = CounterTask.info
    obs = Observation([], info, seed=0, step=0, expert_action="a")
    draws = [RandomPolicy().act(obs, random.Random("counter:train:5")).action for _ in range(3)]
    assert len(set(draws)) == 1  # the same episode seed, the same action
    summary = collect(client, ExpertPolicy(), store, CollectConfig(episodes=2, seed_start=5))
    assert (summary.mean_return, summary.success_rate, summary.valid_action_share) == (
        3.0,
        1.0,
        1.0,
    )


def test_policy_specs():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/") == "http://h/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    with pytest.raises(PolicySpecError, match="needs --model"):
        make_policy("openai:http://localhost:1")
    with pytest.raises(PolicySpecError, match="openai:http"):
        make_policy("openai:localhost")
    with pytest.raises(PolicySpecError, match="not a model here"):
        make_policy("no/such-model-anywhere")
