"""The Crafter task (skipped without the ``crafter`` extra): a small world keeps it fast."""

from __future__ import annotations

import random
from typing import ClassVar

import pytest

pytest.importorskip("crafter")

from vlmtune.data.rows import parse_messages  # noqa: E402
from vlmtune.tasks.crafter_task import ACTIONS, CrafterTask  # noqa: E402
from vlmtune.tasks.episodes import LocalTaskClient  # noqa: E402
from vlmtune.tasks.protocol import EpisodeRequest, StepRequest, TaskInfo  # noqa: E402

STEPS = 100


class SmallCrafter(CrafterTask):
    """A 32x32 world (world generation is most of a reset) and short episodes."""

    AREA: ClassVar[tuple[int, int]] = (32, 32)
    info: ClassVar[TaskInfo] = CrafterTask.info.model_copy(update={"max_steps": STEPS})


def _achievements(client: LocalTaskClient, seed: int, policy: str) -> int:
    pick = random.Random(seed)
    ep = client.start(EpisodeRequest(seed=seed))
    upcoming, unlocked, done = ep.expert_action, 0, False
    while not done:
        action = upcoming if policy == "expert" else pick.choice(ACTIONS)
        result = client.step(ep.episode_id, StepRequest(action=action))
        assert result.info.expert_action == upcoming  # the relabel of the step just taken
        unlocked += len(result.info.achievements)
        upcoming, done = result.next_expert_action, result.done
    client.close(ep.episode_id)
    return unlocked


def test_the_expert_beats_random_play() -> None:
    client = LocalTaskClient(SmallCrafter)
    expert = sum(_achievements(client, seed, "expert") for seed in range(2))
    random_play = sum(_achievements(client, seed, "random") for seed in range(2))
    assert expert >= random_play + 4, (expert, random_play)


def test_an_episode_runs_and_nonsense_plays_noop() -> None:
    client = LocalTaskClient(SmallCrafter)
    info = client.info()
    assert len(info.actions) == 17 and info.invalid_action == "noop"
    ep = client.start(EpisodeRequest(seed=3))
    again = client.start(EpisodeRequest(seed=3))
    assert ep.messages == again.messages and ep.expert_action == again.expert_action
    assert ep.expert_action in ACTIONS
    text = ep.messages[1]["content"][1]["text"]
    assert "health 9, food 9, drink 9, energy 9" in text
    result = client.step(ep.episode_id, StepRequest(completion="I would rather not say"))
    assert (result.info.action, result.info.valid_action, result.done) == ("noop", False, False)
    assert result.info.extra["inventory"]["health"] == 9
    result = client.step(ep.episode_id, StepRequest(completion="Move left."))
    assert (result.info.action, result.info.valid_action) == ("move_left", True)
    assert result.messages is not None
    parse_messages([*result.messages, {"role": "assistant", "content": "noop"}])
    image_only = client.start(EpisodeRequest(seed=3, image_only=True))
    assert [p["type"] for p in image_only.messages[1]["content"]] == ["image_url"]


@pytest.mark.parametrize(
    ("completion", "action"),
    [
        ("noop", "noop"),
        ("Move left", "move_left"),
        ("MAKE_WOOD_PICKAXE.", "make_wood_pickaxe"),
        ("I will place_table now", "place_table"),
        ("do or noop", None),
        ("jump", None),
    ],
)
def test_parse(completion: str, action: str | None) -> None:
    assert CrafterTask().parse(completion) == action
