"""The lamp task: determinism, the random and expert success rates, parsing, prompts."""

from __future__ import annotations

import random

import pytest

from vlmtune.data.rows import parse_messages
from vlmtune.tasks.episodes import LocalTaskClient
from vlmtune.tasks.lamp import SYSTEM, LampTask
from vlmtune.tasks.protocol import EpisodeRequest, StepRequest


def _success_rate(policy: str, seeds: range) -> float:
    client = LocalTaskClient("lamp")
    pick = random.Random(0)
    wins = 0.0
    for seed in seeds:
        ep = client.start(EpisodeRequest(seed=seed))
        action = ep.expert_action if policy == "expert" else pick.choice(client.info().actions)
        result = client.step(ep.episode_id, StepRequest(action=action))
        assert result.done and result.messages is None
        wins += result.reward
        client.close(ep.episode_id)
    return wins / len(seeds)


def test_random_succeeds_about_one_time_in_four_and_the_expert_always() -> None:
    assert 0.18 <= _success_rate("random", range(400)) <= 0.32
    assert _success_rate("expert", range(400)) == 1.0


def test_the_seed_and_split_determine_the_episode() -> None:
    client = LocalTaskClient("lamp")
    first = client.start(EpisodeRequest(seed=7))
    again = client.start(EpisodeRequest(seed=7))
    other_split = client.start(EpisodeRequest(seed=7, split="test"))
    assert first.messages == again.messages and first.expert_action == again.expert_action
    assert first.messages != other_split.messages
    # Colour is not the only thing a seed changes: two seeds of one colour differ.
    frames: dict[str, set[str]] = {}
    for seed in range(40):
        task = LampTask()
        task.reset(seed, "train")
        frames.setdefault(task.colour, set()).add(task.image)
    assert len(frames) == 4 and all(len(v) > 3 for v in frames.values())


@pytest.mark.parametrize(
    ("completion", "action"),
    [
        ("red", "red"),
        ("Red.", "red"),
        ("  YELLOW\n", "yellow"),
        ("The answer is blue", "blue"),
        ("green, green", "green"),
        ("red or green", None),
        ("reddish", None),
        ("", None),
        ("I think that the lamp on the left is most probably blue", None),  # > 8 words
        ("purple", None),
    ],
)
def test_parse_accepts_one_colour_in_a_short_answer(completion: str, action: str | None) -> None:
    assert LampTask().parse(completion) == action


def test_prompts_are_loadable_rows_and_image_only_keeps_the_system_prompt() -> None:
    task = LampTask()
    task.reset(3, "train")
    full, image_only = task.prompt(False), task.prompt(True)
    assert full[0] == image_only[0] == {"role": "system", "content": SYSTEM}
    assert [p["type"] for p in full[1]["content"]] == ["image_url", "text"]
    assert [p["type"] for p in image_only[1]["content"]] == ["image_url"]
    answer = {"role": "assistant", "content": task.expert()}
    for prompt in (full, image_only):
        messages = parse_messages([*prompt, answer])
        assert messages[1].images[0].width == messages[1].images[0].height == 64
        assert parse_messages(prompt, kind="rl")[-1].role == "user"
