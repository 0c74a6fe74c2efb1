"""Rendering equals the model processor's own chat template + tokenization, token for token."""

from __future__ import annotations

import io
from pathlib import Path

import jinja2
import pytest
from PIL import Image

from vlmtune.data.schema import ImagePart, Message, TextPart
from vlmtune.models.tiny import tiny_model_dir
from vlmtune.models.vision import ImagePreprocessor
from vlmtune.render import Renderer, split_prompt_and_answer, to_hf_messages

REFERENCE_TEMPLATE = Path("/work/shared/reference/qwen3-vl-instruct/chat_template.jinja")


@pytest.fixture(scope="module")
def processor():
    from vlmtune.models.loading import load_processor

    # Limits low enough that the test images give a few tokens each, varied by size.
    return load_processor(tiny_model_dir(), min_pixels=32 * 32, max_pixels=32 * 32 * 40)


def _img(w: int, h: int, color: str = "red", fmt: str = "PNG") -> ImagePart:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, fmt)
    return ImagePart(data=buf.getvalue(), mime=f"image/{fmt.lower()}", width=w, height=h)


def _user(*parts) -> Message:
    return Message("user", [TextPart(p) if isinstance(p, str) else p for p in parts])


def _assistant(text: str) -> Message:
    return Message("assistant", [TextPart(text)])


def _system(text: str) -> Message:
    return Message("system", [TextPart(text)])


CASES = {
    "single_image": [_user(_img(64, 64), "What digit is this?"), _assistant("7")],
    "image_after_text": [_user("Look:", _img(100, 37)), _assistant("A thin strip.")],
    "several_images_one_message": [
        _user(_img(64, 64), _img(200, 90, "blue"), "Compare\n\nthe two.", _img(33, 300)),
        _assistant("The first one is larger."),
    ],
    "multi_turn_images": [
        _user(_img(64, 64), "What digit is this?"),
        _assistant("3"),
        _user("And this one?", _img(128, 64, "green")),
        _assistant("\n\n8 and 9 \n"),
        _user(_img(70, 70, fmt="JPEG")),
        _assistant("Done."),
    ],
    "system_prompt": [
        _system("You are a helpful assistant."),
        _user(_img(64, 64), "Digit?"),
        _assistant("5"),
    ],
    "system_text_only_multiturn": [
        _system("  Answer with one digit.\n"),
        _user("Hello!"),
        _assistant("Hi."),
        _user(_img(96, 96), " What is it? "),
        _assistant("1"),
    ],
    "unicode_and_whitespace": [
        _user("  ü日本 😀\t tabs\n\n\n", _img(64, 64)),
        _assistant("   spaced   out\n"),
    ],
}


def _processor_ids(processor, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    text = processor.apply_chat_template(
        to_hf_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    images = [
        Image.open(io.BytesIO(p.data)).convert("RGB")
        for m in messages
        if m.role == "user"
        for p in m.images
    ]
    out = processor(text=[text], images=images or None)
    return list(out["input_ids"][0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_processor(processor, case: str) -> None:
    messages = CASES[case]
    renderer = Renderer(processor.tokenizer, ImagePreprocessor.from_processor(processor), None)
    rendered = renderer.render(messages)
    ids = rendered.model_input.to_ints(renderer.image_token_id)
    assert ids == _processor_ids(processor, messages, add_generation_prompt=False)
    assert len(rendered.weights) == len(ids)
    assert rendered.images_dropped == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_prompt_matches_processor(processor, case: str) -> None:
    prompt, answer = split_prompt_and_answer(CASES[case])
    assert answer
    renderer = Renderer(processor.tokenizer, ImagePreprocessor.from_processor(processor), None)
    ids = renderer.render_prompt(prompt).model_input.to_ints(renderer.image_token_id)
    assert ids == _processor_ids(processor, prompt, add_generation_prompt=True)


def test_template_drops_system_images_and_later_system_turns(processor) -> None:
    messages = [
        Message("system", [TextPart("Be brief."), _img(64, 64)]),
        _user(_img(64, 64), "Digit?"),
        _system("ignored by the template"),
        _assistant("4"),
    ]
    renderer = Renderer(processor.tokenizer, ImagePreprocessor.from_processor(processor), None)
    rendered = renderer.render(messages)
    assert rendered.model_input.to_ints(renderer.image_token_id) == _processor_ids(
        processor, messages, add_generation_prompt=False
    )
    assert rendered.images_dropped == 1 and len(rendered.model_input.images) == 1


def test_reference_template_in_plain_jinja_matches_processor(processor) -> None:
    if not REFERENCE_TEMPLATE.exists():
        pytest.skip("reference files not available")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(REFERENCE_TEMPLATE.read_text())
    for case, messages in CASES.items():
        hf = to_hf_messages(messages)
        for gen in (False, True):
            expected = processor.apply_chat_template(hf, tokenize=False, add_generation_prompt=gen)
            got = template.render(messages=hf, add_generation_prompt=gen)
            assert got == expected, case


# --- tool calling: rows in the OpenAI fine-tuning format, parsed by the data layer ------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": 'Current weather <for> a city & "region"',  # tojson must not escape
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
ZOOM = {
    "type": "function",
    "function": {"name": "zoom", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER, ZOOM]


def _call(name: str, arguments, call_id: str | None = None) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return call if call_id is None else {"id": call_id, **call}


def _calls(*calls, content=None) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def _tool(content, call_id: str | None = None) -> dict:
    out = {"role": "tool", "content": content}
    return out if call_id is None else {**out, "tool_call_id": call_id}


def _image_url(w: int, h: int, seed: int = 0) -> dict:
    from tests.conftest import png_data_url

    return {"type": "image_url", "image_url": {"url": png_data_url(w, h, seed)}}


ASK = {"role": "user", "content": [_image_url(64, 64), {"type": "text", "text": "Weather here?"}]}
OBJECT_ARGS = {"city": "Zürich", "unit": "C", "nested": {"z": 1, "a": [1, 2.5, None, True]}}
TOOL_CASES: dict[str, tuple[list[dict], list[dict]]] = {
    "tools_without_system": (
        TOOLS,
        [ASK, _calls(_call("get_weather", OBJECT_ARGS)), _tool("18C, sunny"),
         {"role": "assistant", "content": "It is sunny."}],
    ),
    "tools_with_system": (
        TOOLS,
        [{"role": "system", "content": "You are a weather bot."}, ASK,
         _calls(_call("get_weather", '{"city":"Bern"}', "call_1"), content=""),
         _tool("rain", "call_1"), {"role": "assistant", "content": "Rain."}],
    ),
    "system_as_parts_with_tools": (
        [ZOOM],
        [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, ASK,
         _calls(_call("zoom", {})), _tool("ok"), {"role": "assistant", "content": "Done."}],
    ),
    "multi_call_with_text_and_consecutive_responses": (
        TOOLS,
        [ASK,
         _calls(_call("get_weather", '{"city": "Paris",  "unit":"F"}', "a"),
                _call("zoom", {"level": 2}, "b"), _call("get_weather", OBJECT_ARGS, "c"),
                content="Checking three things.\n"),
         _tool("20F", "a"), _tool([_image_url(40, 90, 1), {"type": "text", "text": "zoomed"}], "b"),
         _tool("  ", "c"),
         {"role": "assistant", "content": "Cold, and here is the zoom."}],
    ),
    "tool_response_then_user_turn": (
        TOOLS,
        [ASK, _calls(_call("get_weather", {"city": "Oslo"})), _tool("snow"),
         {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"},
                                      _image_url(32, 48, 2)]},
         _calls(_call("get_weather", {"city": "Oslo", "day": "tomorrow"})), _tool("sleet"),
         {"role": "assistant", "content": "Sleet."}],
    ),
    "calls_without_declared_tools": (
        [],
        [{"role": "system", "content": "Tools: get_weather(city)."}, ASK,
         _calls(_call("get_weather", {"city": "Rome"})), _tool("hot"),
         {"role": "assistant", "content": "Hot."}],
    ),
    "tools_declared_plain_answer": (
        TOOLS,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ),
}  # fmt: skip


def _parse_row(tools: list[dict], messages: list[dict], tmp_path: Path, kind: str = "sft"):
    from vlmtune.data.refs import RefContext
    from vlmtune.data.rows import RowParser

    row = {"messages": messages, **({"tools": tools} if tools else {})}
    return RowParser(kind, RefContext(tmp_path), None).parse(row, 1).row  # type: ignore[arg-type]


def _hf(messages: list[dict]) -> list[dict]:
    """The raw messages as the processor's template takes them (images as image parts)."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = [
                {"type": "image"} if p["type"] == "image_url" else p for p in m["content"]
            ]
        out.append(m)
    return out


def _processor_tool_ids(processor, tools, messages, parsed, add_generation_prompt: bool):
    text = processor.apply_chat_template(
        _hf(messages), tools=tools or None, tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )  # fmt: skip
    images = [
        Image.open(io.BytesIO(p.data)).convert("RGB")
        for m in parsed
        if m.role in ("user", "tool")
        for p in m.images
    ]
    return list(processor(text=[text], images=images or None)["input_ids"][0]), text


@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_tool_rows_render_as_the_template(processor, case: str, tmp_path: Path) -> None:
    tools, messages = TOOL_CASES[case]
    row = _parse_row(tools, messages, tmp_path)
    renderer = Renderer(processor.tokenizer, ImagePreprocessor.from_processor(processor), None)
    rendered = renderer.render(row.messages, tools=row.tools)
    ids = rendered.model_input.to_ints(renderer.image_token_id)
    expected, text = _processor_tool_ids(processor, tools, messages, row.messages, False)
    assert ids == expected, text
    assert len(rendered.weights) == len(ids) and rendered.images_dropped == 0


@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_generation_prompt_after_tool_turns(processor, case: str, tmp_path: Path) -> None:
    tools, messages = TOOL_CASES[case]
    # Cut each conversation after its first run of tool responses (or its first user
    # turn): the prompt the model answers a tool result from.
    cut = next(
        (i + 1 for i, m in enumerate(messages)
         if m["role"] == "tool" and (i + 1 == len(messages) or messages[i + 1]["role"] != "tool")),
        next(i + 1 for i, m in enumerate(messages) if m["role"] == "user"),
    )  # fmt: skip
    prompt = messages[:cut]
    row = _parse_row(tools, prompt, tmp_path, kind="rl")
    renderer = Renderer(processor.tokenizer, ImagePreprocessor.from_processor(processor), None)
    ids = renderer.render_prompt(row.messages, row.tools).model_input.to_ints(
        renderer.image_token_id
    )
    expected, text = _processor_tool_ids(processor, tools, prompt, row.messages, True)
    assert ids == expected, text


def test_tool_call_weights_train_the_calls_not_the_responses(processor, tmp_path: Path) -> None:
    tools, messages = TOOL_CASES["multi_call_with_text_and_consecutive_responses"]
    row = _parse_row(tools, messages, tmp_path)
    renderer = Renderer(processor.tokenizer, ImagePreprocessor.from_processor(processor), None)
    rendered = renderer.render(row.messages, tools=row.tools)
    ids = rendered.model_input.to_ints(renderer.image_token_id)
    trained = [t for t, w in zip(ids, rendered.weights, strict=True) if w > 0]
    calls = (
        'Checking three things.\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris",  "unit":"F"}}\n</tool_call>\n<tool_call>\n{"name": "zoom", '
        '"arguments": {"level": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Zürich", "unit": "C", "nested": {"z": 1, "a": [1, 2.5, '
        "null, true]}}}\n</tool_call>"
    )
    expected = f"{calls}<|im_end|>Cold, and here is the zoom.<|im_end|>"
    assert processor.tokenizer.decode(trained) == expected
    # last_assistant: only the final answer; a weight of 0 on the calling turn likewise.
    last = renderer.render(row.messages, "last_assistant", row.tools)
    trained_last = [t for t, w in zip(ids, last.weights, strict=True) if w > 0]
    assert processor.tokenizer.decode(trained_last) == "Cold, and here is the zoom.<|im_end|>"


def test_reference_template_in_plain_jinja_with_tools(processor, tmp_path: Path) -> None:
    """The reference file renders the tool cases as the processor does, given the
    ``tojson`` transformers installs (plain jinja's sorts keys and escapes HTML)."""
    import json

    if not REFERENCE_TEMPLATE.exists():
        pytest.skip("reference files not available")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    template = env.from_string(REFERENCE_TEMPLATE.read_text())
    for case, (tools, messages) in TOOL_CASES.items():
        hf = _hf(messages)
        expected = processor.apply_chat_template(hf, tools=tools or None, tokenize=False)
        # Plain jinja cannot loop over a null content; transformers renders it as empty.
        plain = [{**m, "content": m["content"] or ""} for m in hf]
        assert template.render(messages=plain, tools=tools) == expected, case


def test_answer_of_a_calling_turn_is_its_call_text(tmp_path: Path) -> None:
    """Exact-match evaluation compares a generation with the text the model was
    trained to write, tool calls included."""
    tools, messages = TOOL_CASES["tools_with_system"]
    row = _parse_row(tools, messages[:3], tmp_path)
    prompt, answer = split_prompt_and_answer(row.messages)
    assert len(prompt) == 2
    assert (
        answer == '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Bern"}}\n</tool_call>'
    )
