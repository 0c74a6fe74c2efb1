"""A chat completion, as the OpenAI route serves it: messages in, choices out.

Messages go through the data layer's row parser (images must be ``data:`` URLs: the
server never reads its own files or the network on a client's behalf) and the
engine's renderer, so a prompt is laid out exactly as in training.

Tools (OpenAI ``tools`` / ``tool_choice``): ``plan_tools`` decides what the prompt
declares and whether the output is split into ``tool_calls``; a forced call
("required", or a named function) is prefilled at the start of the assistant turn
(``vlmtune.tool_calls.forced_prefill``) so even a weak model's output parses, and the
prefill is parsed as part of the completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.engine.engine import TrainingEngine
from vlmtune.protocol.errors import BadRequest, shown
from vlmtune.tool_calls import ParsedCompletion, forced_prefill, parse_completion, parse_forced
from vlmtune.types import SamplingParams

if TYPE_CHECKING:
    from vlmtune.data.schema import Message

ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("none", "auto", "required")


def _check_messages(messages: list[dict[str, Any]]) -> None:
    """Shape checks the row parser does not make: roles, and data URLs only."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}]: role must be one of {list(ROLES)}")
        content = m.get("content")
        if isinstance(content, str) or (content is None and m.get("tool_calls")):
            continue  # a calling turn may have no content: the row parser checks the calls
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
        # Without the request's tools: a past call to a tool no longer offered is no error.
        row = parser.parse({"messages": messages}, 1).row
    except RowError as e:
        raise BadRequest(f"messages: {e}") from None
    assert isinstance(row, RLRow)  # an "rl" parser makes RL rows
    return row.messages


@dataclass(frozen=True)
class ToolPlan:
    """What a request's ``tools`` and ``tool_choice`` ask of one generation."""

    tools: list[dict[str, Any]]  # declared in the prompt ([]: none)
    parse: bool = False  # split the output into tool calls
    forced: str | None = None  # a forced call: "" any function, else the function's name

    @property
    def prefill(self) -> str:
        return "" if self.forced is None else forced_prefill(self.forced or None)

    def parse_output(self, text: str) -> ParsedCompletion | None:
        """``text`` (the prefill included) as content and calls; None: no parsing."""
        if not self.parse:
            return None
        if self.forced is not None:
            return parse_forced(text, self.forced or None)
        return parse_completion(text)


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> ToolPlan:
    """The request's ``tools`` (checked as a training row's are) and ``tool_choice``:
    "auto" (the default with tools), "none" (no tools in the prompt, no parsing),
    "required" (a call is prefilled; with one tool, that tool's), or
    ``{"type": "function", "function": {"name": NAME}}``. Raises ``BadRequest``."""
    from vlmtune.data.errors import RowError
    from vlmtune.data.tools import parse_tools

    try:
        specs = parse_tools(tools)
    except RowError as e:
        raise BadRequest(str(e)) from None
    names = [t["function"]["name"] for t in specs]
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none" or (choice == "auto" and not specs):
        return ToolPlan([])
    if choice == "auto":
        return ToolPlan(specs, parse=True)
    if not specs:
        raise BadRequest(f"tool_choice: {shown(choice)} needs a non-empty 'tools' list")
    if choice == "required":
        return ToolPlan(specs, parse=True, forced=names[0] if len(names) == 1 else "")
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name is None:
        raise BadRequest(
            f"tool_choice: must be one of {list(TOOL_CHOICES)} or "
            '{"type": "function", "function": {"name": ...}} '
            f"(got {shown(choice)})"
        )
    if name not in names:
        raise BadRequest(
            f"tool_choice.function.name: {shown(name)} is not one of the tools ({', '.join(names)})"
        )
    return ToolPlan(specs, parse=True, forced=name)


def generate(
    engine: TrainingEngine,
    messages: list[Message],
    params: SamplingParams,
    n: int,
    plan: ToolPlan | None = None,
) -> dict[str, Any]:
    """``n`` completions of the rendered prompt, each with its text token by token (the
    plan's prefill not included: it is part of the prompt)."""
    plan = plan or ToolPlan([])
    rendered = engine.renderer.render_prompt(messages, plan.tools, plan.prefill)
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


def assistant_message(
    text: str, finish: str, plan: ToolPlan
) -> tuple[dict[str, Any], str, list[str]]:
    """OpenAI's ``message`` and ``finish_reason`` for one completion (``text`` without
    the prefill), and the tool-call problems (blocks left in the content, and why).

    With calls, ``finish_reason`` is "tool_calls" (as OpenAI and vLLM say it, even when
    the token limit cut the text after them) and ``content`` is null unless there was text.
    """
    parsed = plan.parse_output(plan.prefill + text)
    if parsed is None:
        return {"role": "assistant", "content": text}, finish, []
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if not parsed.tool_calls:
        return message, finish, parsed.problems
    message["tool_calls"] = parsed.tool_calls
    return message, "tool_calls", parsed.problems


ARGUMENT_CHARS = 16  # streamed arguments come in pieces of this size, as OpenAI's do


def stream_deltas(message: dict[str, Any], pieces: list[str], prefill: str) -> list[dict]:
    """The ``delta`` of each chunk after the first (role) one: text token by token, or,
    with calls, the content then each call as OpenAI streams it (index, id, type and
    name first, then the arguments in pieces)."""
    calls = message.get("tool_calls")
    if not calls:
        return [{"content": p} for p in [prefill, *pieces] if p]
    deltas: list[dict[str, Any]] = []
    if message["content"] is not None:
        deltas.append({"content": message["content"]})
    for k, call in enumerate(calls):
        head = {"name": call["function"]["name"], "arguments": ""}
        deltas.append({"tool_calls": [{"index": k, "id": call["id"], "type": "function", "function": head}]})  # fmt: skip
        args = call["function"]["arguments"]
        for at in range(0, len(args), ARGUMENT_CHARS):
            piece = {"arguments": args[at : at + ARGUMENT_CHARS]}
            deltas.append({"tool_calls": [{"index": k, "function": piece}]})
    return deltas
