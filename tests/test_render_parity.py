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
