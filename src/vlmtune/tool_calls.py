"""Tool calls as Qwen3-VL writes them: text to render, and model output to parse.

The chat template declares the tools in the system turn (one JSON line per spec inside
``<tools>``) and writes each call as ``<tool_call>\\n{"name": NAME, "arguments":
ARGS}\\n</tool_call>``, ARGS being the argument string verbatim or an object through
``tojson`` (``json.dumps``, key order kept, non-ASCII as is). The functions here build
exactly those strings (the renderer's parity tests hold them to the template) and
split a completion back into content and OpenAI ``tool_calls``. Pure: no torch.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmtune.data.schema import ToolCall

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def tools_system_text(system: str | None, tools: Sequence[dict[str, Any]]) -> str:
    """The system turn's body when tools are declared: the system prompt (if any), a
    blank line, then the ``# Tools`` block."""
    lines = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    prefix = "" if system is None else system + "\n\n"
    return f"{prefix}{_TOOLS_HEAD}{lines}{_TOOLS_TAIL}"


def call_prefix(name: str) -> str:
    """A call's text up to its arguments: what the server prefills for a named call."""
    return f'{OPEN}\n{{"name": "{name}", "arguments": '


def format_call(call: ToolCall) -> str:
    return f"{call_prefix(call.name)}{call.arguments}}}\n{CLOSE}"


def assistant_text(content: str, calls: Sequence[ToolCall]) -> str:
    """An assistant turn's text as the template writes it: the content, then each call
    on its own line (no newline before the first when there is no content)."""
    out = content
    for k, call in enumerate(calls):
        if k > 0 or content:
            out += "\n"
        out += format_call(call)
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCompletion:
    """A completion split as OpenAI returns it.

    ``content``: the text outside the parsed calls (the template's newline before each
    call removed); None when calls were found and nothing else but whitespace.
    ``tool_calls``: OpenAI ``tool_calls`` entries, ``arguments`` re-serialised as a JSON
    string the way the template's ``tojson`` writes objects, so a client that sends the
    call back gets the same prompt the model produced. ``problems``: each block that was
    not a call (left in ``content`` as written) and why.
    """

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _call_json(body: str) -> tuple[str, dict[str, Any]] | str:
    """(name, arguments) from a block's body, or why it is not a call."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at char {e.pos})"
    if not isinstance(obj, dict):
        return "not a JSON object"
    name, args = obj.get("name"), obj.get("arguments")
    if not isinstance(name, str) or not name.strip():
        return "no string 'name'"
    if isinstance(args, str):  # some models write the arguments as a JSON string
        with contextlib.suppress(json.JSONDecodeError):
            args = json.loads(args)
    if not isinstance(args, dict):
        return "'arguments' is not a JSON object"
    return name, args


def _block_end(text: str, start: int) -> tuple[int, int, bool]:
    """(end of the body, end of the block, closed?) for a block opening at ``start``: it
    runs to its ``</tool_call>``, or unterminated to the next ``<tool_call>`` or the end."""
    body = start + len(OPEN)
    close, reopen = text.find(CLOSE, body), text.find(OPEN, body)
    if close >= 0 and (reopen < 0 or close < reopen):
        return close, close + len(CLOSE), True
    end = reopen if reopen >= 0 else len(text)
    return end, end, False


def parse_completion(text: str, new_id: Callable[[], str] = new_call_id) -> ParsedCompletion:
    """Split ``text`` into content and tool calls. Never raises.

    A block is a call when its body is a JSON object with a non-empty string ``name``
    and an object ``arguments``; an unterminated block (the model stopped before
    ``</tool_call>``) counts when its JSON is complete. Anything else stays in the
    content as written and is named in ``problems``.
    """
    segments: list[str] = []
    calls: list[dict[str, Any]] = []
    problems: list[str] = []
    pos = 0
    while (start := text.find(OPEN, pos)) >= 0:
        segment = text[pos:start]
        body_end, pos, closed = _block_end(text, start)
        got = _call_json(text[start + len(OPEN) : body_end])
        if isinstance(got, str):
            state = "" if closed else "unterminated, "
            problems.append(f"<tool_call> block {len(calls) + len(problems) + 1}: {state}{got}")
            segments.append(segment + text[start:pos])
            continue
        # The template writes one newline between a call and what precedes it.
        segments.append(segment[:-1] if segment.endswith("\n") else segment)
        name, args = got
        calls.append(
            {
                "id": new_id(),
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
    if not calls:
        return ParsedCompletion(text, [], problems)
    content = "".join(segments) + text[pos:]
    return ParsedCompletion(content if content.strip() else None, calls, problems)


def forced_prefill(name: str | None) -> str:
    """The start of the assistant turn the server writes to force a call (``tool_choice``
    "required", or a named function): the generation continues it."""
    return call_prefix(name) if name else f"{OPEN}\n"


def parse_forced(
    text: str, name: str | None, new_id: Callable[[], str] = new_call_id
) -> ParsedCompletion:
    """Parse a completion that starts with ``forced_prefill(name)`` (the prefill is part
    of ``text``).

    A forced named call is always returned: when the model's arguments do not make a
    JSON object, they are returned as generated (OpenAI's own contract: arguments may
    be invalid JSON, validate them) and the problem is named.
    """
    parsed = parse_completion(text, new_id)
    prefix = call_prefix(name) if name else ""
    if parsed.tool_calls or not name or not text.startswith(prefix):
        return parsed
    body_end, end, _ = _block_end(text, 0)
    args = text[len(prefix) : max(body_end, len(prefix))].rstrip()
    if args.endswith("}"):  # the template's "}" closing the call object
        args = args[:-1].rstrip()
    rest = text[end:]
    call = {"id": new_id(), "type": "function", "function": {"name": name, "arguments": args}}
    problem = "the forced call's arguments are not a JSON object; returned as generated"
    return ParsedCompletion(rest if rest.strip() else None, [call], [*parsed.problems, problem])
