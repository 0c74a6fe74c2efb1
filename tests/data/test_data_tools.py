"""Tool-calling rows (OpenAI fine-tuning format): accepted forms, rejections, training."""

from __future__ import annotations

import pytest

from vlmtune.data import PreferenceRow, RLRow, SFTRow, TextPart, ToolCall

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
USER = {"role": "user", "content": "Weather in Bern?"}


def call(name="get_weather", arguments='{"city": "Bern"}', call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls, content=None):
    return {"role": "assistant", "content": content, "tool_calls": list(calls) or [call()]}


def tool(content="rain", call_id="call_1"):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


ANSWER = {"role": "assistant", "content": "Rain in Bern."}


def row(*messages, tools=(WEATHER,)):
    out = {"messages": list(messages)}
    if tools is not None:
        out["tools"] = list(tools)
    return out


def _one(load, obj, kind="sft"):
    rows, report = load([obj], kind)
    assert report.dropped == [], report.dropped
    return rows[0]


def _reason(load, obj, kind="sft"):
    rows, report = load([obj], kind)
    assert rows == [], rows
    return report.dropped[0]["reason"]


def test_tool_call_row_is_parsed(load, mk):
    parsed = _one(load, row(USER, calling(), tool(), ANSWER))
    assert isinstance(parsed, SFTRow) and parsed.tools == [WEATHER]
    user, assistant, response, answer = parsed.messages
    assert assistant.parts == [] and assistant.tool_calls == [
        ToolCall("get_weather", '{"city": "Bern"}', "call_1")
    ]
    assert response.role == "tool" and response.tool_call_id == "call_1"
    assert response.parts == [TextPart("rain")] and answer.text == "Rain in Bern."


def test_arguments_as_object_keep_key_order_and_unicode(load):
    args = {"z": "Zürich", "a": [1, None]}
    parsed = _one(load, row(USER, calling(call(arguments=args)), tool(), ANSWER))
    assert parsed.messages[1].tool_calls[0].arguments == '{"z": "Zürich", "a": [1, null]}'


def test_string_arguments_are_kept_verbatim(load):
    parsed = _one(load, row(USER, calling(call(arguments='{"city":"Bern" }')), tool(), ANSWER))
    assert parsed.messages[1].tool_calls[0].arguments == '{"city":"Bern" }'


def test_calls_without_function_wrapper_and_without_ids(load):
    bare = {"name": "get_weather", "arguments": {"city": "Bern"}}
    parsed = _one(load, row(USER, calling(bare), {"role": "tool", "content": "x"}, ANSWER))
    assert parsed.messages[1].tool_calls == [ToolCall("get_weather", '{"city": "Bern"}')]


def test_calling_turn_text_and_blank_tool_output_are_kept_verbatim(load):
    parsed = _one(load, row(USER, calling(content="  "), tool(content=""), ANSWER))
    assert parsed.messages[1].text == "  " and parsed.messages[2].parts == []


def test_tool_message_images_and_consecutive_responses(load, mk):
    two = calling(call(call_id="a"), call(arguments={"city": "Oslo"}, call_id="b"))
    image = {"role": "tool", "tool_call_id": "b", "content": [mk.img(mk.png_url()), {"type": "text", "text": "map"}]}  # fmt: skip
    parsed = _one(load, row(USER, two, tool(call_id="a"), image, ANSWER))
    assert len(parsed.messages[3].images) == 1


def test_without_declared_tools_any_call_is_allowed(load):
    parsed = _one(load, row(USER, calling(call(name="anything")), tool(), ANSWER, tools=None))
    assert parsed.tools == [] and parsed.messages[1].tool_calls[0].name == "anything"


def test_rl_prompt_may_end_with_tool_responses(load):
    parsed = _one(load, row(USER, calling(), tool()), kind="rl")
    assert isinstance(parsed, RLRow) and parsed.tools == [WEATHER]


def test_preference_pair_over_tool_calls(load):
    prompt = [USER, calling(), tool()]
    pair = {
        "tools": [WEATHER],
        "chosen": {"messages": [*prompt, ANSWER]},
        "rejected": {"messages": [*prompt, calling(call(arguments={"city": "Oslo"}))]},
    }
    parsed = _one(load, pair, kind="preference")
    assert isinstance(parsed, PreferenceRow) and parsed.tools == [WEATHER]
    other = [USER, calling(call(arguments={"city": "Paris"})), tool()]
    differ = {**pair, "rejected": {"messages": [*other, ANSWER]}}
    assert _reason(load, differ, kind="preference") == (
        "chosen and rejected prompts differ (messages[1] tool calls)"
    )


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (
            row(USER, calling(call(arguments='{"city": "Bern"')), tool(), ANSWER),
            "messages[1].tool_calls[0].function.arguments: is not valid JSON "
            "(Expecting ',' delimiter at char 15)",
        ),
        (
            row(USER, calling(call(arguments="[1, 2]")), tool(), ANSWER),
            "messages[1].tool_calls[0].function.arguments: must be a JSON object, or a string "
            "holding one (got array)",
        ),
        (
            row(USER, calling(call(name=" ")), tool(), ANSWER),
            "messages[1].tool_calls[0].function.name: must be a non-empty string (got ' ')",
        ),
        (
            row(USER, calling({"type": "function", "function": {"name": "get_weather"}})),
            "messages[1].tool_calls[0].function.arguments: missing",
        ),
        (
            row(USER, calling(call(name="get_time")), tool(), ANSWER),
            "messages[1].tool_calls[0]: calls 'get_time', which the row's tools do not "
            "declare (declared: get_weather)",
        ),
        (
            row(USER, tool(), ANSWER),
            "messages[1].role: a tool message must follow an assistant message with "
            "tool_calls (or another tool message)",
        ),
        (
            row(USER, ANSWER, tool(), ANSWER),
            "messages[2].role: a tool message must follow an assistant message with "
            "tool_calls (or another tool message)",
        ),
        (
            row(USER, calling(), tool(call_id="call_9"), ANSWER),
            "messages[2].tool_call_id: 'call_9' is not one of the calls it answers (call_1)",
        ),
        (
            row(USER, calling(), {**tool(), "weight": 1}, ANSWER),
            "messages[2].weight: tool responses are never trained (drop the weight)",
        ),
        (
            row({**USER, "tool_calls": [call()]}, ANSWER),
            "messages[0].tool_calls: only assistant messages make tool calls (this one is 'user')",
        ),
        (
            row(USER, {**ANSWER, "tool_call_id": "x"}),
            "messages[1].tool_call_id: only tool messages answer a call (this one is 'assistant')",
        ),
        (
            row(USER, calling(), {"role": "tool", "content": None}, ANSWER),
            "messages[2].content: missing",
        ),
        (
            row(USER, {"role": "assistant", "content": None}),
            "messages[1].content: missing",
        ),
        (
            row(USER, ANSWER, tools=[{"name": "f"}]),
            'tools[0]: must be {"type": "function", '
            '"function": {"name": ..., "parameters": {...}}}',
        ),  # fmt: skip
        (
            row(USER, ANSWER, tools=[{"type": "function", "function": {"name": ""}}]),
            "tools[0].function.name: must be a non-empty string (got '')",
        ),
        (
            row(
                USER,
                ANSWER,
                tools=[{"type": "function", "function": {"name": "f", "parameters": []}}],
            ),
            "tools[0].function.parameters: must be a JSON schema object (got array)",
        ),  # fmt: skip
        (
            row(USER, ANSWER, tools=[WEATHER, WEATHER]),
            "tools[1].function.name: function 'get_weather' is declared twice",
        ),
        (
            {"messages": [USER, ANSWER], "tools": {}},
            "tools: must be an array of function specs (got object)",
        ),
    ],
)
def test_rejections_name_the_field(load, obj, reason):
    assert _reason(load, obj) == reason


def test_sft_trains_the_calls_and_never_the_responses(load):
    """Through the same ``render_row`` training and ``data validate --config`` use."""
    from vlmtune.render_rows import RenderLimits, build_renderer, render_row

    parsed = _one(load, row(USER, calling(), tool(content="RAINRAIN"), ANSWER))
    renderer = build_renderer("tiny-qwen3-vl")
    result = render_row(parsed, renderer, RenderLimits(sequence_length=1024))
    assert result.problem is None
    (rendered,) = result.sides
    ids = rendered.model_input.to_ints(renderer.image_token_id)
    text = renderer.tokenizer.decode(ids)
    assert "# Tools" in text and '"name": "get_weather"' in text.split("<tools>\n")[1]
    trained = renderer.tokenizer.decode(
        [t for t, w in zip(ids, rendered.weights, strict=True) if w > 0]
    )
    assert trained == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>'
        "<|im_end|>Rain in Bern.<|im_end|>"
    )
    # A calling turn with weight 0 trains only the answer; the row is kept.
    quiet = _one(load, row(USER, {**calling(), "weight": 0}, tool(), ANSWER))
    (rendered,) = render_row(quiet, renderer, RenderLimits(sequence_length=1024)).sides
    ids = rendered.model_input.to_ints(renderer.image_token_id)
    trained = renderer.tokenizer.decode(
        [t for t, w in zip(ids, rendered.weights, strict=True) if w > 0]
    )
    assert trained == "Rain in Bern.<|im_end|>"
