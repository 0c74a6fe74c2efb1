"""``tools`` / ``tool_choice`` in ``/v1/chat/completions``, with the tiny model.

A random tiny model never writes a tool call by itself: a named ``tool_choice``
forces the structure (the call is prefilled) and the parser's own cases are in
tests/test_tool_calls.py. The prompt sizes are checked against vlmtune's renderer,
whose parity with the chat template is tests/test_render_parity.py's.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import png_data_url

MODEL = "tiny-qwen3-vl"
PRESS = {
    "type": "function",
    "function": {
        "name": "press",
        "description": "Press a button",
        "parameters": {"type": "object", "properties": {"button": {"type": "string"}}},
    },
}
ZOOM = {"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}
ASK = {"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": png_data_url(32, 32, seed=3)}},
    {"type": "text", "text": "Which button?"}]}  # fmt: skip
NAMED = {"type": "function", "function": {"name": "press"}}


@pytest.fixture(scope="module")
def renderer():
    from vlmtune.render_rows import build_renderer

    return build_renderer(MODEL)


def _prompt_tokens(renderer, messages, tools=None, prefill="") -> int:
    from vlmtune.data.rows import parse_messages

    parsed = parse_messages(messages, kind="rl")
    return renderer.render_prompt(parsed, tools, prefill).length


def _chat(api, **body: Any) -> dict:
    r = api.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 6, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _refused(api, fragment: str, **body: Any) -> None:
    r = api.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"], r.json()


def _stream(api, **body: Any) -> list[dict]:
    body = {"model": MODEL, "max_tokens": 6, "stream": True, **body}
    with api.stream("POST", "/v1/chat/completions", json=body) as s:
        assert s.status_code == 200
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    return [json.loads(line[6:]) for line in lines[:-1]]


def _reassemble(chunks: list[dict]) -> dict[int, dict]:
    """Choices from stream chunks, merged as OpenAI's clients merge them: content
    concatenated; a tool call per ``index``, its id/type/name from the chunk that
    opens it and its ``arguments`` concatenated."""
    out: dict[int, dict] = {}
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        (choice,) = c["choices"]
        msg = out.setdefault(choice["index"], {"content": None, "tool_calls": {}, "finish": None})
        delta = choice["delta"]
        if delta.get("content"):
            msg["content"] = (msg["content"] or "") + delta["content"]
        for tc in delta.get("tool_calls", []):
            call = msg["tool_calls"].setdefault(tc["index"], {"function": {"arguments": ""}})
            for key in ("id", "type"):
                if key in tc:
                    call[key] = tc[key]
            if "name" in tc.get("function", {}):
                call["function"]["name"] = tc["function"]["name"]
            call["function"]["arguments"] += tc.get("function", {}).get("arguments", "")
        if choice["finish_reason"] is not None:
            msg["finish"] = choice["finish_reason"]
    return out


def test_named_tool_choice_forces_a_call(api, renderer):
    body = _chat(api, messages=[ASK], tools=[PRESS, ZOOM], tool_choice=NAMED, n=2)
    from vlmtune.tool_calls import call_prefix

    assert body["usage"]["prompt_tokens"] == _prompt_tokens(
        renderer, [ASK], [PRESS, ZOOM], call_prefix("press")
    )
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
        assert call["function"]["name"] == "press"
        assert isinstance(call["function"]["arguments"], str)
    problems = body["vlmtune"]["tool_call_problems"]
    assert len(problems) == 2 and all(isinstance(p, list) for p in problems)


def test_required_with_one_tool_is_that_tool(api):
    body = _chat(api, messages=[ASK], tools=[PRESS], tool_choice="required")
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "press"


def test_tools_are_rendered_with_auto_and_left_out_with_none(api, renderer):
    auto = _chat(api, messages=[ASK], tools=[PRESS, ZOOM])
    none = _chat(api, messages=[ASK], tools=[PRESS, ZOOM], tool_choice="none")
    plain = _chat(api, messages=[ASK])
    assert auto["usage"]["prompt_tokens"] == _prompt_tokens(renderer, [ASK], [PRESS, ZOOM])
    assert none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert auto["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert "tool_call_problems" in auto["vlmtune"] and "tool_call_problems" not in none["vlmtune"]
    for body in (auto, none):
        message = body["choices"][0]["message"]
        assert "tool_calls" not in message and isinstance(message["content"], str)


def test_history_with_calls_and_tool_responses(api, renderer):
    history = [
        ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "zoom", "arguments": '{"level": 2}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "press", "arguments": {"button": "red"}}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(48, 32, seed=4)}},
            {"type": "text", "text": "zoomed in"}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "pressed"},
    ]  # fmt: skip
    body = _chat(api, messages=history, tools=[PRESS, ZOOM], tool_choice=NAMED)
    from vlmtune.tool_calls import call_prefix

    expected = _prompt_tokens(renderer, history, [PRESS, ZOOM], call_prefix("press"))
    assert body["usage"]["prompt_tokens"] == expected
    # A past call to a tool the request no longer offers is history, not an error.
    assert _chat(api, messages=history, tools=[PRESS], tool_choice="none")["choices"]


def test_streamed_tool_calls_reassemble_to_the_response(api):
    # Seeded, so both requests sample the same text (greedy gives only newlines).
    request = {"messages": [ASK], "tools": [PRESS, ZOOM], "tool_choice": NAMED,
               "seed": 7, "max_tokens": 12}  # fmt: skip
    whole = _chat(api, **request)["choices"][0]
    chunks = _stream(api, **request)
    first = chunks[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": None}
    opening = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:-1]
               if "id" in c["choices"][0]["delta"].get("tool_calls", [{}])[0]]  # fmt: skip
    assert [(o["index"], o["type"], o["function"]["name"]) for o in opening] == [
        (0, "function", "press")
    ]
    (streamed,) = _reassemble(chunks).values()
    assert streamed["finish"] == whole["finish_reason"] == "tool_calls"
    assert streamed["content"] == whole["message"]["content"]
    (call,) = streamed["tool_calls"].values()
    (expected,) = whole["message"]["tool_calls"]
    assert call["function"] == expected["function"] and expected["function"]["arguments"]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])


def test_streamed_text_without_calls_is_token_deltas(api):
    chunks = _stream(api, messages=[ASK], tools=[PRESS], temperature=0)
    (choice,) = _reassemble(chunks).values()
    whole = _chat(api, messages=[ASK], tools=[PRESS], temperature=0)["choices"][0]
    assert choice["tool_calls"] == {} and choice["content"] == (whole["message"]["content"] or None)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"tools": "press"}, "tools"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name: must be"),
        ({"tools": [{"name": "press"}]}, "tools[0]: must be"),
        ({"tools": [PRESS, PRESS]}, "tools[1].function.name: function 'press' is declared twice"),
        ({"tools": [PRESS], "tool_choice": "sometimes"}, "tool_choice: must be one of"),
        ({"tools": [PRESS], "tool_choice": {"type": "function"}}, "tool_choice: must be one of"),
        ({"tool_choice": "required"}, "tool_choice: 'required' needs a non-empty 'tools' list"),
        (
            {"tools": [PRESS], "tool_choice": {"type": "function", "function": {"name": "zoom"}}},
            "tool_choice.function.name: 'zoom' is not one of the tools (press)",
        ),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages: messages[0].role: a tool message must follow an assistant message",
        ),
        (
            {"messages": [ASK, {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "press", "arguments": "{oops"}}]},
                {"role": "tool", "content": "x"}]},
            "messages[1].tool_calls[0].function.arguments: is not valid JSON",
        ),
        (
            {"messages": [ASK, {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "press", "arguments": "{}"}}]},
                {"role": "tool", "content": [
                    {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]},
            "messages[2].content[0]: images must be data: URLs",
        ),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400_naming_the_field(api, body, fragment):
    _refused(api, fragment, **{"messages": [ASK], **body})


def test_stream_deltas_reassemble_long_arguments_and_several_calls():
    """OpenAI's chunking, on a hand-made message (the tiny model writes short arguments)."""
    from vlmtune.server.chat import ARGUMENT_CHARS, stream_deltas

    args = json.dumps({"button": "red", "note": "ü" * 40, "n": [1, 2, 3]}, ensure_ascii=False)
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "press", "arguments": args}},
        {"id": "call_2", "type": "function", "function": {"name": "zoom", "arguments": "{}"}},
    ]
    message = {"role": "assistant", "content": "Two calls.", "tool_calls": calls}
    deltas = stream_deltas(message, ["ignored"], "<tool_call>\n")
    assert deltas[0] == {"content": "Two calls."}
    argument_chunks = [d for d in deltas if "id" not in d.get("tool_calls", [{"id": 0}])[0]]
    assert len(argument_chunks) == -(-len(args) // ARGUMENT_CHARS) + 1  # + zoom's "{}"
    chunks = [{"object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]  # fmt: skip
    (choice,) = _reassemble(chunks).values()
    assert choice["content"] == "Two calls."
    assert [choice["tool_calls"][k] for k in (0, 1)] == calls
    # Without calls: the prefill, then the text token by token.
    plain = {"role": "assistant", "content": "<tool_call>\nab"}
    assert stream_deltas(plain, ["a", "", "b"], "<tool_call>\n") == [
        {"content": "<tool_call>\n"},
        {"content": "a"},
        {"content": "b"},
    ]


def test_remote_eval_of_a_tool_row_sends_the_history_and_the_tools(server, key):
    """`vlmtune eval --server` on a tool-calling row: the history's calls and tool turns
    and the row's tools travel (the server would refuse a tool turn without its call),
    and a forced-structure reply comes back as the model's text, calls included."""
    from vlmtune.data.rows import parse_messages
    from vlmtune.data.tools import message_json
    from vlmtune.sdk.http import remote_chat_completion

    history = [
        ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "press", "arguments": '{"button": "red"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "pressed"},
    ]  # fmt: skip
    parsed = parse_messages(history, kind="rl")
    # What travels is the row as written (one conversion, also the rewards' row dict).
    assert [message_json(m)["role"] for m in parsed] == ["user", "assistant", "tool"]
    assert message_json(parsed[1])["tool_calls"][0]["function"] == {
        "name": "press", "arguments": '{"button": "red"}',
    }  # fmt: skip
    assert message_json(parsed[2])["tool_call_id"] == "call_1"
    text = remote_chat_completion(server.url, key, MODEL, parsed, max_tokens=3, tools=[PRESS])
    assert isinstance(text, str)
