"""The episode layer: parsing, the invalid-action rule, truncation, the expert, eviction."""

from __future__ import annotations

import pytest

from tests.tasks.fakes import NoFallbackWalk, WalkTask
from vlmtune.tasks.episodes import Episodes, LocalTaskClient
from vlmtune.tasks.protocol import EpisodeRequest, StepRequest, TaskError
from vlmtune.tasks.registry import UnknownTask


def test_a_completion_is_parsed_and_an_action_is_taken_as_given() -> None:
    client = LocalTaskClient(WalkTask)
    ep = client.start(EpisodeRequest(seed=0))
    r = client.step(ep.episode_id, StepRequest(completion="I go RIGHT."))
    assert (r.info.action, r.info.valid_action, r.reward) == ("right", True, 1.0)
    r = client.step(ep.episode_id, StepRequest(action="left"))
    assert (r.info.action, r.info.valid_action, r.reward) == ("left", True, 0.0)
    assert r.messages == [{"role": "user", "content": "obs 2 at 0"}]


def test_an_invalid_completion_plays_the_invalid_action() -> None:
    client = LocalTaskClient(WalkTask)
    ep = client.start(EpisodeRequest(seed=0))
    r = client.step(ep.episode_id, StepRequest(completion="left or right?"))
    assert (r.info.action, r.info.valid_action, r.done) == ("noop", False, False)
    assert r.messages == [{"role": "user", "content": "obs 1 at 0"}]


def test_without_an_invalid_action_a_nonsense_completion_ends_the_episode() -> None:
    client = LocalTaskClient(NoFallbackWalk)
    ep = client.start(EpisodeRequest(seed=0))
    r = client.step(ep.episode_id, StepRequest(completion="banana"))
    assert (r.reward, r.done, r.truncated, r.info.valid_action, r.info.action) == (
        0.0, True, False, False, None,
    )  # fmt: skip
    assert r.messages is None and r.next_expert_action is None
    with pytest.raises(TaskError, match="is over") as e:
        client.step(ep.episode_id, StepRequest(action="right"))
    assert e.value.status == 400


def test_truncation_at_max_steps_and_termination() -> None:
    client = LocalTaskClient(WalkTask)
    ep = client.start(EpisodeRequest(seed=0))
    results = [client.step(ep.episode_id, StepRequest(action="noop")) for _ in range(5)]
    assert [r.done for r in results] == [False] * 4 + [True]
    assert results[-1].truncated and results[-1].messages is None
    ep = client.start(EpisodeRequest(seed=1))  # starts at 1: two steps right arrive
    results = [client.step(ep.episode_id, StepRequest(action="right")) for _ in range(2)]
    assert results[-1].done and not results[-1].truncated
    assert results[-1].info.achievements == ["arrived"]


def test_the_expert_action_belongs_to_the_observation_acted_on() -> None:
    episodes = Episodes(WalkTask)
    ep = episodes.start(EpisodeRequest(seed=0))
    assert ep.expert_action == "right"  # observation 0
    upcoming = ep.expert_action
    for n in range(4):
        r = episodes.step(ep.episode_id, StepRequest(action="noop"))
        # What the expert would have played at the prompt this step answered ...
        assert r.info.expert_action == upcoming == ("right" if n % 2 == 0 else "left")
        # ... and at the next prompt, which the next step answers.
        assert r.next_expert_action == ("left" if n % 2 == 0 else "right")
        upcoming = r.next_expert_action
    task = episodes._open[ep.episode_id][0].task
    assert isinstance(task, WalkTask) and task.expert_calls == [
        0,
        1,
        2,
        3,
        4,
    ]  # once per observation


def test_unknown_episodes_actions_and_splits_are_clear_errors() -> None:
    client = LocalTaskClient(WalkTask)
    with pytest.raises(TaskError, match="unknown episode 'nope'") as e:
        client.step("nope", StepRequest(action="left"))
    assert e.value.status == 404
    with pytest.raises(TaskError) as e:
        client.close("nope")
    assert e.value.status == 404
    ep = client.start(EpisodeRequest(seed=0))
    with pytest.raises(TaskError, match=r"allowed: left, right, noop") as e:
        client.step(ep.episode_id, StepRequest(action="jump"))
    assert e.value.status == 400
    with pytest.raises(TaskError, match=r"unknown split 'test'.*splits: train"):
        client.start(EpisodeRequest(seed=0, split="test"))
    with pytest.raises(UnknownTask, match=r"unknown task 'nope' \(known: crafter, lamp\)"):
        LocalTaskClient("nope")


def test_closed_episodes_are_gone() -> None:
    client = LocalTaskClient(WalkTask)
    ep = client.start(EpisodeRequest(seed=0))
    client.close(ep.episode_id)
    assert len(client.episodes) == 0
    with pytest.raises(TaskError, match="closed, or dropped"):
        client.step(ep.episode_id, StepRequest(action="left"))


def test_idle_episodes_expire_and_the_open_count_is_capped() -> None:
    now = [0.0]
    episodes = Episodes(WalkTask, ttl_s=10, max_open=3, clock=lambda: now[0])
    ids = [episodes.start(EpisodeRequest(seed=0)).episode_id for _ in range(3)]
    now[0] = 5.0
    episodes.step(ids[0], StepRequest(action="left"))  # ids[0] is now the most recent
    fourth = episodes.start(EpisodeRequest(seed=0)).episode_id  # over the cap: LRU goes
    assert set(episodes._open) == {ids[0], ids[2], fourth}
    now[0] = 14.0  # ids[2] idle for 14 s: gone; ids[0] (9 s) and fourth (9 s) stay
    episodes.step(fourth, StepRequest(action="left"))
    assert set(episodes._open) == {ids[0], fourth}
    assert len(episodes) == 2
    with pytest.raises(Exception, match="unknown episode"):
        episodes.step(ids[2], StepRequest(action="left"))


def test_an_episode_is_its_owners_alone() -> None:
    from vlmtune.protocol.errors import NotFound

    table = Episodes(WalkTask)
    ep = table.start(EpisodeRequest(seed=0), owner="tenant-a")
    with pytest.raises(NotFound, match="unknown episode"):
        table.step(ep.episode_id, StepRequest(action="right"), owner="tenant-b")
    with pytest.raises(NotFound, match="unknown episode"):
        table.close(ep.episode_id, owner="tenant-b")
    # The owner, and an operator (owner None), still reach it.
    assert table.step(ep.episode_id, StepRequest(action="right"), owner="tenant-a").reward == 1.0
    assert table.step(ep.episode_id, StepRequest(action="left"), owner=None).reward == 0.0
    table.close(ep.episode_id, owner="tenant-a")
    assert len(table) == 0
