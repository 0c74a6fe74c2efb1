"""Exact-match evaluation by greedy generation (used by ``vlmtune eval`` and in training)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmtune.data.schema import SFTRow
from vlmtune.render import split_prompt_and_answer
from vlmtune.sdk.client import SamplingClient
from vlmtune.types import SamplingParams


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace-collapsed, stripped: ``' The  Cat\\n' -> 'the cat'``."""
    return re.sub(r"\s+", " ", text).strip().casefold()


@dataclass
class EvalResult:
    accuracy: float
    n: int
    predictions: list[dict[str, Any]] = field(default_factory=list)


def evaluate_exact_match(
    sampler: SamplingClient,
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
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts, answers = [], []
        for row in chunk:
            prompt_messages, answer = split_prompt_and_answer(row.messages)
            prompts.append(renderer.render_prompt(prompt_messages).model_input)
            answers.append(answer)
        responses = sampler.sample_many(prompts, 1, params).result()
        for row, answer, response in zip(chunk, answers, responses, strict=True):
            text = renderer.decode(response.sequences[0].tokens)
            ok = normalize_answer(text) == normalize_answer(answer)
            correct += ok
            predictions.append(
                {"line": row.line, "prediction": text, "answer": answer, "correct": ok}
            )
    n = len(predictions)
    return EvalResult(accuracy=correct / n if n else 0.0, n=n, predictions=predictions)
