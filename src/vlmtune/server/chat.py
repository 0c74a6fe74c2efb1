"""A chat completion, as the OpenAI route serves it: messages in, choices out.

Messages go through the data layer's row parser (images must be ``data:`` URLs: the
server never reads its own files or the network on a client's behalf) and the
engine's renderer, so a prompt is laid out exactly as in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.engine.engine import TrainingEngine
from vlmtune.protocol.errors import BadRequest
from vlmtune.types import SamplingParams

if TYPE_CHECKING:
    from vlmtune.data.schema import Message

ROLES = ("system", "user", "assistant")


def _check_messages(messages: list[dict[str, Any]]) -> None:
    """Shape checks the row parser does not make: roles, and data URLs only."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}]: role must be one of {list(ROLES)}")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content: must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
                raise BadRequest(f"messages[{i}].content[{j}]: parts are text or image_url")
            if part["type"] == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise BadRequest(
                        f"messages[{i}].content[{j}]: images must be data: URLs "
                        "(data:image/png;base64,...); this server fetches no URLs"
                    )


def parse_messages(messages: list[dict[str, Any]], empty_dir: Path) -> list[Message]:
    from vlmtune.data.errors import RowError
    from vlmtune.data.refs import RefContext
    from vlmtune.data.rows import RowParser
    from vlmtune.data.schema import RLRow

    _check_messages(messages)
    parser = RowParser("rl", RefContext(base_dir=empty_dir), max_images_per_message=None)
    try:
        row = parser.parse({"messages": messages}, 1).row
    except RowError as e:
        raise BadRequest(f"messages: {e}") from None
    assert isinstance(row, RLRow)  # an "rl" parser makes RL rows
    return row.messages


def generate(
    engine: TrainingEngine, messages: list[Message], params: SamplingParams, n: int
) -> dict[str, Any]:
    """``n`` completions of the rendered prompt, each with its text token by token."""
    rendered = engine.renderer.render_prompt(messages)
    out = engine.sample([rendered.model_input], n, params)[0].sequences
    stop_ids = set(engine.renderer.stop_token_ids)
    choices = []
    for s in out:
        tokens = [t for t in s.tokens if t not in stop_ids]
        pieces, prev = [], ""
        for k in range(1, len(tokens) + 1):  # per-token text, for streaming
            text = engine.renderer.decode(tokens[:k])
            pieces.append(text[len(prev) :])
            prev = text
        choices.append(
            {"text": prev, "pieces": pieces, "finish": s.stop_reason, "n": len(s.tokens)}
        )
    return {
        "choices": choices,
        "prompt_tokens": rendered.length,
        "dropped": rendered.images_dropped,
    }
