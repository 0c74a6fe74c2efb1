"""Exact-match evaluation by greedy generation (used by ``vlmtune eval`` and in training)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmtune.data.schema import SFTRow
from vlmtune.render import split_prompt_and_answer
from vlmtune.sdk.protocol import SamplingClientProtocol
from vlmtune.types import SamplingParams


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace-collapsed, stripped: ``' The  Cat\\n' -> 'the cat'``."""
    return re.sub(r"\s+", " ", text).strip().casefold()


@dataclass
class EvalResult:
    accuracy: float
    n: int
    predictions: list[dict[str, Any]] = field(default_factory=list)


def _score(row: SFTRow, answer: str, text: str) -> dict[str, Any]:
    ok = normalize_answer(text) == normalize_answer(answer)
    return {"line": row.line, "prediction": text, "answer": answer, "correct": ok}


def _result(predictions: list[dict[str, Any]]) -> EvalResult:
    n = len(predictions)
    correct = sum(p["correct"] for p in predictions)
    return EvalResult(accuracy=correct / n if n else 0.0, n=n, predictions=predictions)


def evaluate_exact_match_remote(
    server: str,
    api_key: str | None,
    model: str,
    rows: Sequence[SFTRow],
    *,
    max_new_tokens: int = 32,
) -> EvalResult:
    """The same metric against a model served by ``vlmtune serve`` (chat completions)."""
    from vlmtune.sdk.http import remote_chat_completion

    predictions = []
    for row in rows:
        prompt_messages, answer = split_prompt_and_answer(row.messages)
        text = remote_chat_completion(
            server, api_key, model, prompt_messages, max_tokens=max_new_tokens, tools=row.tools
        )
        predictions.append(_score(row, answer, text))
    return _result(predictions)


def evaluate_exact_match(
    sampler: SamplingClientProtocol,
    rows: Sequence[SFTRow],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> EvalResult:
    """Greedy-decode the prompt of each row (messages before its last assistant turn)
    and compare with that assistant turn after ``normalize_answer``."""
    renderer = sampler.renderer
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    predictions: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts, answers = [], []
        for row in chunk:
            prompt_messages, answer = split_prompt_and_answer(row.messages)
            prompts.append(renderer.render_prompt(prompt_messages, row.tools).model_input)
            answers.append(answer)
        responses = sampler.sample_many(prompts, 1, params).result()
        for row, answer, response in zip(chunk, answers, responses, strict=True):
            predictions.append(_score(row, answer, renderer.decode(response.sequences[0].tokens)))
    return _result(predictions)
