"""The filter: rows in vlmtune's format, prompts exact, empty targets dropped with a reason,
every row read back by the data layer's own loader, train and validation split by episode."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from tests.traces.fakes import CounterTask, ScriptedPolicy, fake_prompt
from vlmtune.data.validate import load_dataset
from vlmtune.tasks.episodes import LocalTaskClient
from vlmtune.traces.collect import CollectConfig, collect
from vlmtune.traces.filter import EMPTY_TARGET, FilterOptions, filter_traces, write_rows
from vlmtune.traces.policies import Decision, ExpertPolicy, Observation
from vlmtune.traces.store import Step, TraceStore


class Says:
    """Answers ``fn(seed, step)`` as a completion."""

    model = None

    def __init__(self, name: str, fn: Callable[[int, int], str]) -> None:
        self.name, self.fn = name, fn

    def act(self, observation: Observation, rng: random.Random) -> Decision:
        return Decision(completion=self.fn(observation.seed, observation.step))

    def close(self) -> None:
        pass


def _collect(store: TraceStore, policy, episodes: int = 5, **kw) -> None:
    collect(LocalTaskClient(CounterTask), policy, store, CollectConfig(episodes=episodes, **kw))


def _run(store, tmp_path, **options):
    return filter_traces(store, FilterOptions(**options), tmp_path)


def _loads(tmp_path, rows, kind):
    path = tmp_path / f"{kind}.jsonl"
    write_rows(path, rows)
    loaded, report = load_dataset(path, kind, max_images_per_message=None)
    assert report.dropped == [] and len(loaded) == len(rows)  # the loader takes every row
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def store(tmp_path):
    with TraceStore(tmp_path / "t.db") as s:
        yield s


def test_sft_rows_keep_the_system_prompt_and_the_prompt_byte_for_byte(store, tmp_path):
    _collect(store, ScriptedPolicy())
    result = _run(store, tmp_path, to="sft")
    rows = _loads(tmp_path, result.train, "sft")
    assert len(rows) == 12  # 4 good episodes x 3 steps; the failed episode has none
    for row in rows:
        meta = row["metadata"]
        expected = fake_prompt(meta["seed"], meta["step"], image_only=False)
        assert json.dumps(row["messages"][:-1]) == json.dumps(expected)
        assert row["messages"][0] == {"role": "system", "content": expected[0]["content"]}
    seed1 = [r["messages"][-1] for r in rows if r["metadata"]["seed"] == 1]
    assert seed1 == [{"role": "assistant", "content": c} for c in ("b", "a", "???")]
    assert result.report.episodes_dropped == {"episode ended in an error": 1}


def test_image_only_prompts_survive_exactly(store, tmp_path):
    _collect(store, ExpertPolicy(), episodes=2, image_only=True)
    rows = _loads(tmp_path, _run(store, tmp_path, to="sft").train, "sft")
    for row in rows:
        meta = row["metadata"]
        assert meta["image_only"] is True
        assert json.dumps(row["messages"][:-1]) == json.dumps(
            fake_prompt(meta["seed"], meta["step"], image_only=True)
        )
        assert [p["type"] for p in row["messages"][1]["content"]] == ["image_url"]


def test_an_empty_target_is_a_dropped_row_with_its_reason(store, tmp_path):
    _collect(store, Says("blank", lambda seed, step: "  " if step == 1 else "a"), episodes=3)
    result = _run(store, tmp_path, to="sft")
    assert result.report.rows_dropped[EMPTY_TARGET] == 3  # seeds 0, 1, 2 at step 1
    assert len(result.train) == 6
    assert all(r["messages"][-1]["content"].strip() for r in result.train)


def test_relabel_expert_answers_every_step_with_the_experts_action(store, tmp_path):
    _collect(store, Says("wrong", lambda seed, step: "b"), episodes=3)
    result = _run(store, tmp_path, to="sft", relabel="expert")
    rows = _loads(tmp_path, result.train, "sft")
    assert len(rows) == 9
    assert {r["messages"][-1]["content"] for r in rows} == {"a"}
    assert {r["metadata"]["action"] for r in rows} == {"b"}  # what the policy did


def test_preference_pairs_on_the_same_observation_by_return_to_go(store, tmp_path):
    _collect(store, ExpertPolicy(), episodes=3)
    _collect(store, Says("wrong", lambda seed, step: "b"), episodes=3)
    result = _run(store, tmp_path, to="preference")
    rows = _loads(tmp_path, result.train, "preference")
    assert len(rows) == 9  # seeds 0, 1, 2 x 3 observations, each "a" (rtg 3-t) over "b" (0)
    for row in rows:
        meta = row["metadata"]
        prompt = fake_prompt(meta["seed"], meta["step"], image_only=False)
        assert row["chosen"]["messages"] == [*prompt, {"role": "assistant", "content": "a"}]
        assert row["rejected"]["messages"] == [*prompt, {"role": "assistant", "content": "b"}]
        assert meta["return_to_go"] > meta["rejected_return_to_go"]


def test_preference_pairs_expert_against_the_policy(store, tmp_path):
    _collect(store, ScriptedPolicy(), episodes=3)  # a b a / b a ??? / a b a
    result = _run(store, tmp_path, to="preference", pairs="expert")
    rows = _loads(tmp_path, result.train, "preference")
    assert len(rows) == 4
    assert {r["chosen"]["messages"][-1]["content"] for r in rows} == {"a"}
    assert {r["rejected"]["messages"][-1]["content"] for r in rows} == {"b", "???"}
    assert result.report.rows_dropped == {"the policy played the expert's action (no pair)": 5}


def test_rl_prompts_carry_what_a_reward_needs(store, tmp_path):
    _collect(store, ExpertPolicy(), episodes=2)
    _collect(store, Says("wrong", lambda seed, step: "b"), episodes=2)
    result = _run(store, tmp_path, to="rl")
    rows = _loads(tmp_path, result.train, "rl")
    assert len(rows) == 6  # 2 seeds x 3 observations; the second policy's are duplicates
    assert result.report.rows_dropped == {
        "duplicate of a row already kept (same prompt and answer)": 6
    }
    for row in rows:
        assert row["messages"][-1]["role"] == "user"
        meta = row["metadata"]
        assert (meta["answer"], meta["expert_action"], meta["actions"]) == ("a", "a", ["a", "b"])


def test_episode_filters_count_their_reasons(store, tmp_path):
    _collect(store, ScriptedPolicy())  # returns 2, 1, 2, error, 2
    _collect(store, ExpertPolicy(), episodes=2, split="test", seed_start=10)
    report = _run(store, tmp_path, to="sft", success_only=True, splits=["train"]).report
    assert report.episodes_dropped == {
        "episode ended in an error": 1,
        "split not selected (--split)": 2,
        "not a success (--success-only)": 1,
    }
    assert report.train_rows == 9
    assert _run(store, tmp_path, to="sft", min_return=2.5).report.train_rows == 6
    assert _run(store, tmp_path, to="sft", min_achievements=2).report.train_rows == 15
    assert _run(store, tmp_path, to="sft", policies=["expert"]).report.train_rows == 6
    valid = _run(store, tmp_path, to="sft", valid_only=True).report
    assert valid.rows_dropped == {"invalid action (--valid-only)": 1}


def test_split_by_episode_puts_no_episode_on_both_sides(store, tmp_path):
    _collect(store, ExpertPolicy(), episodes=20, seed_start=4)
    _collect(store, Says("wrong", lambda seed, step: "b"), episodes=20, seed_start=4)
    for to in ("sft", "preference"):
        result = _run(store, tmp_path, to=to, validation_fraction=0.3, seed=1)
        sides = []
        for rows in (result.train, result.validation):
            ids = {r["metadata"]["rollout"] for r in rows}
            ids |= {r["metadata"].get("rejected_rollout") for r in rows} - {None}
            sides.append(ids)
        assert sides[0] and sides[1] and not sides[0] & sides[1]
        assert result.report.validation_episodes == len(sides[1])
        texts = [
            {json.dumps(r, sort_keys=True) for r in rs} for rs in (result.train, result.validation)
        ]
        assert not texts[0] & texts[1]
    first, again = (
        _run(store, tmp_path, to="sft", validation_fraction=0.3, seed=1) for _ in range(2)
    )
    assert first.validation == again.validation  # the split is seeded
    other = _run(store, tmp_path, to="sft", validation_fraction=0.3, seed=2)
    assert other.validation != first.validation


def test_a_row_the_loader_refuses_is_dropped_with_the_loaders_reason(store, tmp_path):
    bad = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "what is this?"},
    ]}]  # fmt: skip
    rid = store.start_rollout(task="counter", split="train", seed=0, policy="p", model=None,
                              image_only=False)  # fmt: skip
    store.add_step(Step(rid, 0, bad, "a", "a", True, 1.0, True))
    store.finish_rollout(rid, episode_return=1.0, steps=1, success=None, achievements=[],
                         error=None)  # fmt: skip
    store.flush()
    result = _run(store, tmp_path, to="sft")
    assert result.train == []
    ((reason, n),) = result.report.rows_dropped.items()
    assert n == 1 and reason.startswith("refused by the row loader: ")
