"""Splitting a completion into content and OpenAI tool calls; the strings the template writes."""

from __future__ import annotations

import itertools
import json
import re

from vlmtune.data.schema import ToolCall
from vlmtune.tool_calls import (
    assistant_text,
    call_prefix,
    forced_prefill,
    parse_completion,
    parse_forced,
)


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def block(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def fn(parsed, k=0):
    return parsed.tool_calls[k]["function"]


def test_plain_text_is_content():
    parsed = parse_completion("The lamp is red.")
    assert (parsed.content, parsed.tool_calls, parsed.problems) == ("The lamp is red.", [], [])


def test_one_call_only_has_null_content_and_openai_shape():
    parsed = parse_completion(block('{"name": "press", "arguments": {"button":"red"}}'))
    assert parsed.content is None and parsed.problems == []
    (call,) = parsed.tool_calls
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
    assert call["type"] == "function"
    # Re-serialised as the template's tojson writes objects (so a round trip is exact).
    assert call["function"] == {"name": "press", "arguments": '{"button": "red"}'}


def test_text_before_and_several_calls():
    text = (
        "I will press both.\n"
        + block('{"name": "press", "arguments": {"button": "red"}}')
        + "\n"
        + block('{"name": "press", "arguments": {"button": "blue", "n": [1, 2.5]}}')
        + " done"
    )
    parsed = parse_completion(text, ids())
    assert parsed.content == "I will press both. done"
    assert [c["id"] for c in parsed.tool_calls] == ["call_0", "call_1"]
    assert json.loads(fn(parsed, 1)["arguments"]) == {"button": "blue", "n": [1, 2.5]}


def test_invalid_block_stays_in_content_and_is_reported():
    bad = block('{"name": "press", "arguments": {"button": }')
    text = "a\n" + bad + "\n" + block('{"name": "zoom", "arguments": {}}')
    parsed = parse_completion(text, ids())
    assert parsed.content == "a\n" + bad
    assert [fn(parsed)["name"]] == ["zoom"]
    assert parsed.problems == ["<tool_call> block 1: not valid JSON (Expecting value at char 43)"]


def test_blocks_that_are_json_but_not_calls():
    for body, why in [
        ("[1]", "not a JSON object"),
        ('{"arguments": {}}', "no string 'name'"),
        ('{"name": "", "arguments": {}}', "no string 'name'"),
        ('{"name": "f", "arguments": [1]}', "'arguments' is not a JSON object"),
        ('{"name": "f"}', "'arguments' is not a JSON object"),
    ]:
        parsed = parse_completion(block(body))
        assert parsed.tool_calls == [] and parsed.content == block(body)
        assert parsed.problems == [f"<tool_call> block 1: {why}"], body


def test_arguments_written_as_a_json_string_are_accepted():
    parsed = parse_completion(block('{"name": "f", "arguments": "{\\"x\\": 1}"}'))
    assert fn(parsed)["arguments"] == '{"x": 1}'


def test_unterminated_blocks():
    # The model stopped right after a complete call: it counts.
    done = parse_completion('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n', ids())
    assert done.content is None and fn(done) == {"name": "f", "arguments": '{"x": 1}'}
    # Cut mid-arguments (max_tokens): content, reported as unterminated.
    cut = '<tool_call>\n{"name": "f", "arguments": {"x":'
    parsed = parse_completion(cut)
    assert parsed.content == cut and parsed.tool_calls == []
    assert parsed.problems[0].startswith("<tool_call> block 1: unterminated, not valid JSON")
    # An unterminated block ends where the next one opens.
    text = '<tool_call>\n{"name": "f"\n' + block('{"name": "g", "arguments": {}}')
    parsed = parse_completion(text)
    assert [fn(parsed)["name"]] == ["g"] and parsed.content == '<tool_call>\n{"name": "f"\n'


def test_round_trip_with_the_template_text():
    calls = [
        ToolCall("press", '{"button": "red"}'),
        ToolCall("zoom", '{"level": 2, "where": "Zürich"}'),
    ]
    for content in ("", "Let me press it.", "two\nlines"):
        text = assistant_text(content, calls)
        parsed = parse_completion(text)
        assert parsed.content == (content or None)
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls] == [
            (c.name, c.arguments) for c in calls
        ]
        assert assistant_text(content, calls) == text


def test_never_raises_on_fragments():
    fragments = [
        "<tool_call>",
        "</tool_call>",
        "\n",
        '{"name": "f", ',
        '"arguments": {}}',
        "}",
        "x",
    ]
    for combo in itertools.product(fragments, repeat=4):
        text = "".join(combo)
        parsed = parse_completion(text)
        for c in parsed.tool_calls:
            assert isinstance(json.loads(c["function"]["arguments"]), dict)
        if not parsed.tool_calls:
            assert parsed.content == text


def test_forced_named_call_always_returns_the_call():
    prefill = forced_prefill("press")
    assert prefill == call_prefix("press") == '<tool_call>\n{"name": "press", "arguments": '
    good = parse_forced(prefill + '{"button": "red"}}\n</tool_call>', "press", ids())
    assert good.problems == [] and fn(good) == {"name": "press", "arguments": '{"button": "red"}'}
    # A weak model's arguments: returned as generated, and the problem named.
    weak = parse_forced(prefill + "red please}\n</tool_call> and more", "press", ids())
    assert fn(weak) == {"name": "press", "arguments": "red please"}
    assert weak.content == " and more"
    assert weak.problems[-1] == (
        "the forced call's arguments are not a JSON object; returned as generated"
    )
    # Cut off before writing anything.
    assert fn(parse_forced(prefill, "press"))["arguments"] == ""


def test_forced_required_call_without_a_name_is_parsed_normally():
    assert forced_prefill(None) == "<tool_call>\n"
    parsed = parse_forced("<tool_call>\nnonsense", None)
    assert parsed.tool_calls == [] and parsed.content == "<tool_call>\nnonsense"
    ok = parse_forced('<tool_call>\n{"name": "zoom", "arguments": {}}\n</tool_call>', None)
    assert fn(ok)["name"] == "zoom"
