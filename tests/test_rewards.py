"""Reward functions: built-ins, resolution from the job file, and failure containment."""

from __future__ import annotations

import math
import re

import pytest

from tests.conftest import image_part, user
from vlmtune.rewards import (
    RewardError,
    canonical_spec,
    exact_match,
    regex_match,
    resolve_reward,
    row_dict,
    safe_reward,
    score_group,
)


def row(**metadata) -> dict:
    return {"messages": [], "metadata": metadata, "line": 1}


def test_exact_match_normalises_case_and_whitespace():
    assert exact_match("  Seven\n", row(answer="seven")) == 1.0
    assert exact_match("7", row(answer=7)) == 1.0  # a numeric answer compares as text
    assert exact_match("7 ", row(answer="8")) == 0.0
    with pytest.raises(KeyError, match="metadata.answer"):
        exact_match("7", row())


def test_regex_match_format_and_answer_extraction():
    fmt = re.compile(r"^\d$")
    assert regex_match("7", row(), pattern=fmt) == 1.0  # no group: any match scores
    assert regex_match("seven", row(), pattern=fmt) == 0.0
    extract = re.compile(r"Answer:\s*(\d+)")
    assert regex_match("so... Answer: 42", row(answer="42"), pattern=extract) == 1.0
    assert regex_match("Answer: 41", row(answer="42"), pattern=extract) == 0.0
    assert regex_match("Answer: 41", row(), pattern=extract) == 1.0  # no answer: format only
    named = re.compile(r"(?P<junk>x)?<(?P<answer>\w+)>")
    assert regex_match("<Cat>", row(answer="cat"), pattern=named) == 1.0


def test_resolve_builtins_and_regex_errors():
    assert resolve_reward("exact_match") is exact_match
    fn = resolve_reward("regex_match", regex=r"\d")
    assert fn("a1", row()) == 1.0 and fn("a", row()) == 0.0
    with pytest.raises(RewardError, match="reward_regex"):
        resolve_reward("regex_match")
    with pytest.raises(RewardError, match="not a valid regex"):
        resolve_reward("regex_match", regex="(")
    with pytest.raises(RewardError, match="not a built-in"):
        resolve_reward("exact")


def test_resolve_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def length(completion, row):\n    return float(len(completion))\nNOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("my_rewards_mod:length")("abc", row()) == 3.0
    with pytest.raises(RewardError, match="cannot import module 'no_such_reward_module'"):
        resolve_reward("no_such_reward_module:f")
    with pytest.raises(RewardError, match="has no attribute 'nope'"):
        resolve_reward("my_rewards_mod:nope")
    with pytest.raises(RewardError, match="not callable"):
        resolve_reward("my_rewards_mod:NOT_CALLABLE")


def test_resolve_file_path_relative_to_base_dir(tmp_path):
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "score.py").write_text("def one(completion, row):\n    return 1\n")
    assert resolve_reward("rw/score.py:one", base_dir=tmp_path)("x", row()) == 1
    assert canonical_spec("rw/score.py:one", tmp_path) == f"{tmp_path / 'rw' / 'score.py'}:one"
    assert canonical_spec("exact_match", tmp_path) == "exact_match"
    with pytest.raises(RewardError, match="does not exist"):
        resolve_reward("rw/missing.py:one", base_dir=tmp_path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(RewardError, match="boom at import"):
        resolve_reward("broken.py:f", base_dir=tmp_path)


def test_safe_reward_contains_failures():
    def boom(completion, row):
        raise ValueError("bad row")

    assert safe_reward(boom, "x", row()) == (0.0, "ValueError: bad row")
    assert safe_reward(lambda c, r: math.nan, "x", row())[1] == "reward returned nan"
    assert safe_reward(lambda c, r: None, "x", row())[1].startswith("TypeError")
    assert safe_reward(lambda c, r: True, "x", row()) == (1.0, None)
    rewards, errors = score_group(exact_match, ["1", "2", "3"], row(answer="2"))
    assert rewards == [0.0, 1.0, 0.0] and errors == []
    rewards, errors = score_group(exact_match, ["1", "2"], row())  # no answer: both fail
    assert rewards == [0.0, 0.0] and len(errors) == 2


def test_row_dict_is_openai_style_with_data_urls():
    d = row_dict([user(image_part(8, 8), "What digit?")], {"answer": "3"}, line=7)
    assert d["line"] == 7 and d["metadata"] == {"answer": "3"}
    content = d["messages"][0]["content"]
    assert d["messages"][0]["role"] == "user"
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1] == {"type": "text", "text": "What digit?"}
