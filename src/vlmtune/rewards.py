"""Reward functions for RL: ``reward(completion: str, row: dict) -> float``.

``row`` is ``{"messages": [...], "metadata": {...}, "line": n}``: the prompt as
OpenAI-style message dicts (text parts as ``{"type": "text", "text": ...}``, images as
``{"type": "image_url", "image_url": {"url": "data:<mime>;base64,..."}}``), the row's
``metadata`` object from the JSONL, and its 1-based line number.

The job file names the reward in ``[rl] reward``:

- a built-in: ``exact_match`` or ``regex_match`` (see their docstrings);
- ``package.module:function``: imported with ``importlib`` (the module must be importable);
- ``path/to/file.py:function``: loaded from that file, a relative path resolving from
  the TOML's folder.

A name that cannot be resolved raises ``RewardError`` before any training work. A
reward that raises while scoring is the recipe's business: that sample scores 0 and
the error is counted (see ``safe_reward``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmtune.data.schema import Message
from vlmtune.evaluation import normalize_answer

RewardFn = Callable[[str, dict[str, Any]], float]


class RewardError(ValueError):
    """The reward named in the job file cannot be used (unknown, not importable, bad regex)."""


def exact_match(completion: str, row: dict[str, Any]) -> float:
    """1.0 if the completion equals ``metadata.answer`` after ``normalize_answer``
    (case-folded, whitespace collapsed and stripped), else 0.0.

    Raises ``KeyError`` when the row has no ``metadata.answer`` (the recipe counts it).
    """
    answer = row["metadata"].get("answer")
    if answer is None:
        raise KeyError("exact_match needs metadata.answer in every RL row")
    return float(normalize_answer(completion) == normalize_answer(str(answer)))


def regex_match(completion: str, row: dict[str, Any], *, pattern: re.Pattern[str]) -> float:
    """``re.search(pattern, completion)``: 0.0 without a match.

    With a match: if the pattern has a capture group *and* the row has
    ``metadata.answer``, the reward is 1.0 only when the group named ``answer`` (or else
    group 1), normalised like ``exact_match``, equals the answer (answer extraction,
    e.g. ``"Answer: (\\d+)"``); otherwise any match scores 1.0 (a format reward).
    """
    match = pattern.search(completion)
    if match is None:
        return 0.0
    answer = row["metadata"].get("answer")
    if pattern.groups == 0 or answer is None:
        return 1.0
    group = "answer" if "answer" in pattern.groupindex else 1
    captured = match.group(group) or ""
    return float(normalize_answer(captured) == normalize_answer(str(answer)))


BUILTIN_REWARDS = ("exact_match", "regex_match")


def resolve_reward(spec: str, *, regex: str | None = None, base_dir: str | Path = ".") -> RewardFn:
    """The reward callable ``spec`` names (see the module docstring); ``RewardError`` if none."""
    if spec == "exact_match":
        return exact_match
    if spec == "regex_match":
        if not regex:
            raise RewardError("regex_match needs rl.reward_regex (a Python regular expression)")
        try:
            compiled = re.compile(regex)
        except re.error as e:
            raise RewardError(f"rl.reward_regex {regex!r} is not a valid regex: {e}") from None
        return functools.partial(regex_match, pattern=compiled)
    if ":" not in spec:
        raise RewardError(
            f"{spec!r} is not a built-in reward ({', '.join(BUILTIN_REWARDS)}) "
            "nor of the form module:function or path/to/file.py:function"
        )
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_file(Path(base_dir) / target if not Path(target).is_absolute() else target)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:  # ImportError, or the module's own code failing
            raise RewardError(f"cannot import module {target!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardError(f"{target!r} has no attribute {name!r}")
    if not callable(fn):
        raise RewardError(f"{target}:{name} is not callable")
    return fn


def canonical_spec(spec: str, base_dir: str | Path = ".") -> str:
    """``spec`` with a relative file path made absolute (for the run's resolved config)."""
    if ":" in spec:
        target, name = spec.rsplit(":", 1)
        if (target.endswith(".py") or "/" in target) and not Path(target).is_absolute():
            return f"{(Path(base_dir) / target).resolve()}:{name}"
    return spec


def _load_file(path: str | Path) -> Any:
    path = Path(path).resolve()
    if not path.is_file():
        raise RewardError(f"reward file {path} does not exist")
    # A unique module name per file, so two reward files named rewards.py do not clash.
    name = f"vlmtune_reward_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise RewardError(f"{path} failed to import: {type(e).__name__}: {e}") from e
    return module


def safe_reward(fn: RewardFn, completion: str, row: dict[str, Any]) -> tuple[float, str | None]:
    """(reward, None), or (0.0, error text) when ``fn`` raises or returns a non-finite
    or non-numeric value: one bad sample must not stop a run."""
    try:
        value = float(fn(completion, row))
    except Exception as e:
        return 0.0, f"{type(e).__name__}: {e}"
    if not math.isfinite(value):
        return 0.0, f"reward returned {value}"
    return value, None


def score_group(
    fn: RewardFn, completions: list[str], row: dict[str, Any]
) -> tuple[list[float], list[str]]:
    """(one reward per completion, the errors met): see ``safe_reward``."""
    rewards, errors = [], []
    for text in completions:
        value, error = safe_reward(fn, text, row)
        rewards.append(value)
        if error is not None:
            errors.append(error)
    return rewards, errors


def row_dict(messages: list[Message], metadata: dict[str, Any], line: int = 0) -> dict[str, Any]:
    """The ``row`` argument a reward function receives (OpenAI-style messages)."""
    from vlmtune.data.tools import message_json

    out = [message_json(m) for m in messages]
    return {"messages": out, "metadata": metadata, "line": line}
