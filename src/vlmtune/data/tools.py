"""Tool calling in rows: the top-level ``tools``, assistant ``tool_calls``, ``tool`` turns.

The OpenAI fine-tuning format: a row may declare ``"tools": [{"type": "function",
"function": {"name": ..., "parameters": {...}}}]``; an assistant turn may carry
``tool_calls`` (its ``content`` may then be null or empty); each ``{"role": "tool",
"tool_call_id": ..., "content": ...}`` turn answers a call. The specs are kept as
given, key order included, because the chat template writes each one whole.

Rules (each break is a ``RowError`` naming the field):

- a tool spec is ``{"type": "function", "function": {...}}`` with a non-empty string
  ``name``, unique in the row; ``parameters`` (if given) an object;
- a call has a non-empty ``name`` and ``arguments`` that are a JSON object, given as an
  object or as a string that parses to one (the template writes a string verbatim);
- a call naming a function the row does not declare is refused when the row declares
  ``tools``; a row without ``tools`` may call anything (its tools may be described in
  the system prompt, which the template renders as any system prompt);
- a ``tool`` turn follows an assistant turn with ``tool_calls`` or another ``tool`` turn,
  and its ``tool_call_id``, when given, names one of that assistant turn's call ids
  (when those have ids).
"""

from __future__ import annotations

import json
from typing import Any

from vlmtune.data.errors import RowError, type_name
from vlmtune.data.schema import Message, TextPart, ToolCall


def _name(value: Any, where: str, category: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = repr(value) if isinstance(value, str) else type_name(value)
        raise RowError(f"must be a non-empty string (got {got})", category=category, field=where)
    return value


def parse_tools(value: Any) -> list[dict[str, Any]]:
    """The row's ``tools`` (absent or null: none), checked and kept exactly as given."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(
            f"must be an array of function specs (got {type_name(value)})",
            category="malformed tools",
            field="tools",
        )
    seen: set[str] = set()
    for k, tool in enumerate(value):
        at = f"tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RowError(
                'must be {"type": "function", "function": {"name": ..., "parameters": {...}}}',
                category="malformed tool spec",
                field=at,
            )
        spec = tool.get("function")
        if not isinstance(spec, dict):
            raise RowError(
                f"must be an object (got {type_name(spec)})",
                category="malformed tool spec",
                field=f"{at}.function",
            )
        name = _name(spec.get("name"), f"{at}.function.name", "malformed tool spec")
        params = spec.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RowError(
                f"must be a JSON schema object (got {type_name(params)})",
                category="malformed tool spec",
                field=f"{at}.function.parameters",
            )
        if name in seen:
            raise RowError(
                f"function {name!r} is declared twice",
                category="duplicate tool name",
                field=f"{at}.function.name",
            )
        seen.add(name)
    return value


def arguments_json(value: Any, where: str) -> str:
    """A call's arguments as the JSON text the template writes (see ``ToolCall``)."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)  # the template's tojson
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(
                f"is not valid JSON ({e.msg} at char {e.pos})",
                category="tool call arguments are not JSON",
                field=where,
            ) from None
        if isinstance(parsed, dict):
            return value
        value = parsed
    raise RowError(
        f"must be a JSON object, or a string holding one (got {type_name(value)})",
        category="tool call arguments are not a JSON object",
        field=where,
    )


def parse_tool_calls(value: Any, where: str) -> list[ToolCall]:
    """An assistant turn's ``tool_calls`` (null or [] : none)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(
            f"must be an array of calls (got {type_name(value)})",
            category="malformed tool_calls",
            field=where,
        )
    calls = []
    for k, raw in enumerate(value):
        at = f"{where}[{k}]"
        if not isinstance(raw, dict):
            raise RowError(
                f"must be an object (got {type_name(raw)})",
                category="malformed tool call",
                field=at,
            )
        if raw.get("type", "function") != "function":
            raise RowError(
                f"must be 'function' (got {raw.get('type')!r})",
                category="malformed tool call",
                field=f"{at}.type",
            )
        call_id = raw.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise RowError(
                f"must be a string (got {type_name(call_id)})",
                category="malformed tool call",
                field=f"{at}.id",
            )
        # OpenAI nests name and arguments under "function"; the template accepts them
        # at the top of the call too.
        fn, fn_at = (raw["function"], f"{at}.function") if "function" in raw else (raw, at)
        if not isinstance(fn, dict):
            raise RowError(
                f"must be an object (got {type_name(fn)})",
                category="malformed tool call",
                field=fn_at,
            )
        name = _name(fn.get("name"), f"{fn_at}.name", "malformed tool call")
        if "arguments" not in fn:
            raise RowError("missing", category="malformed tool call", field=f"{fn_at}.arguments")
        args = arguments_json(fn["arguments"], f"{fn_at}.arguments")
        calls.append(ToolCall(name=name, arguments=args, id=call_id))
    return calls


def check_tool_fields(
    role: str, calls: list[ToolCall], call_id: Any, raw: dict[str, Any], where: str
) -> None:
    """The tool fields one message may carry, given its role."""
    if calls and role != "assistant":
        raise RowError(
            f"only assistant messages make tool calls (this one is {role!r})",
            category="tool_calls outside an assistant turn",
            field=f"{where}.tool_calls",
        )
    if call_id is not None and role != "tool":
        raise RowError(
            f"only tool messages answer a call (this one is {role!r})",
            category="malformed tool_call_id",
            field=f"{where}.tool_call_id",
        )
    if call_id is not None and not isinstance(call_id, str):
        raise RowError(
            f"must be a string (got {type_name(call_id)})",
            category="malformed tool_call_id",
            field=f"{where}.tool_call_id",
        )
    if role == "tool" and raw.get("weight") == 1:
        raise RowError(
            "tool responses are never trained (drop the weight)",
            category="weight on a tool message",
            field=f"{where}.weight",
        )


def check_tool_turns(messages: list[Message], where: str, tools: list[dict[str, Any]]) -> None:
    """The ordering and naming rules of the module docstring, over a parsed message list."""
    declared = {t["function"]["name"] for t in tools}
    calls: list[ToolCall] = []  # those of the assistant turn the current tool turns answer
    previous: Message | None = None
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if m.role == "assistant":
            calls = m.tool_calls
            for k, call in enumerate(calls):
                if declared and call.name not in declared:
                    raise RowError(
                        f"calls {call.name!r}, which the row's tools do not declare "
                        f"(declared: {', '.join(sorted(declared))})",
                        category="call to an undeclared tool",
                        field=f"{at}.tool_calls[{k}]",
                    )
        elif m.role == "tool":
            follows_call = previous is not None and (
                previous.role == "tool" or (previous.role == "assistant" and calls)
            )
            if not follows_call:
                raise RowError(
                    "a tool message must follow an assistant message with tool_calls "
                    "(or another tool message)",
                    category="tool message without a tool call",
                    field=f"{at}.role",
                )
            ids = [c.id for c in calls if c.id is not None]
            if m.tool_call_id is not None and ids and m.tool_call_id not in ids:
                raise RowError(
                    f"{m.tool_call_id!r} is not one of the calls it answers ({', '.join(ids)})",
                    category="tool_call_id matches no call",
                    field=f"{at}.tool_call_id",
                )
        previous = m


def message_json(m: Message) -> dict[str, Any]:
    """A parsed message back as an OpenAI-style chat message (images as ``data:`` URLs,
    tool calls and tool-call ids kept): what the SDK sends a server and a reward reads."""
    from vlmtune.data.refs import data_url

    content = [
        {"type": "text", "text": p.text}
        if isinstance(p, TextPart)
        else {"type": "image_url", "image_url": {"url": data_url(p.data, p.mime)}}
        for p in m.parts
    ]
    out: dict[str, Any] = {"role": m.role, "content": content}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id or f"call_{k}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for k, c in enumerate(m.tool_calls)
        ]  # fmt: skip
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out
