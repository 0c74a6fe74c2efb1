"""Renderer unit tests: weights, image cap, Datum shift, length policy."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlmtune.data.schema import ImagePart, Message, SFTRow, TextPart
from vlmtune.models.tiny import tiny_model_dir
from vlmtune.models.vision import ImagePreprocessor
from vlmtune.render import (
    Renderer,
    datum_from_rendered,
    image_format,
    split_prompt_and_answer,
)
from vlmtune.render_rows import build_sft_datums
from vlmtune.types import EncodedTextChunk, ImageChunk

IM_START, IM_END, IMAGE_PAD = 151644, 151645, 151655


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    from vlmtune.models.loading import load_processor

    processor = load_processor(tiny_model_dir())
    return Renderer(processor.tokenizer, ImagePreprocessor.from_processor(processor))


def _img(w: int = 64, h: int = 64, fmt: str = "PNG") -> ImagePart:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "red").save(buf, fmt)
    return ImagePart(data=buf.getvalue(), mime=f"image/{fmt.lower()}", width=w, height=h)


def _conv(answer2: str = "9", weight1: float | None = None) -> list[Message]:
    return [
        Message("system", [TextPart("Be brief.")]),
        Message("user", [_img(), TextPart("What digit is this?")]),
        Message("assistant", [TextPart("7")], weight=weight1),
        Message("user", [TextPart("And now?")]),
        Message("assistant", [TextPart(answer2)]),
    ]


def _weighted_text(renderer: Renderer, rendered) -> list[str]:
    """Decoded weighted tokens, special tokens kept."""
    ids = rendered.model_input.to_ints(renderer.image_token_id)
    tok = renderer.tokenizer
    return [tok.decode([t]) for t, w in zip(ids, rendered.weights, strict=True) if w > 0]


def test_weights_prompt_image_and_assistant(renderer: Renderer) -> None:
    rendered = renderer.render(_conv())
    ids = rendered.model_input.to_ints(renderer.image_token_id)
    assert len(ids) == len(rendered.weights) == rendered.length
    # Exactly the answers and their closing <|im_end|> are trained.
    assert _weighted_text(renderer, rendered) == ["7", "<|im_end|>", "9", "<|im_end|>"]
    # Image positions are never trained.
    assert all(w == 0 for t, w in zip(ids, rendered.weights, strict=True) if t == IMAGE_PAD)
    # "<|im_start|>assistant\n" header: 0; the "\n" after the last <|im_end|>: 0.
    last_im_end = len(ids) - 2
    assert ids[last_im_end] == IM_END and rendered.weights[last_im_end] == 1.0
    assert rendered.weights[-1] == 0.0
    header = ids.index(IM_START, ids.index(IM_END, ids.index(IMAGE_PAD)))
    assert rendered.weights[header : header + 3] == [0.0, 0.0, 0.0]


def test_weight_zero_message_and_last_assistant(renderer: Renderer) -> None:
    assert _weighted_text(renderer, renderer.render(_conv(weight1=0.0))) == ["9", "<|im_end|>"]
    last = renderer.render(_conv(), train_on="last_assistant")
    assert _weighted_text(renderer, last) == ["9", "<|im_end|>"]
    half = renderer.render(_conv(weight1=0.5))
    assert sorted(set(half.weights)) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        renderer.render(_conv(), train_on="everything")  # type: ignore[arg-type]


def test_image_chunks(renderer: Renderer) -> None:
    msgs = [
        Message("user", [TextPart("Look"), _img(64, 128, "JPEG")]),
        Message("assistant", [TextPart("ok")]),
    ]
    rendered = renderer.render(msgs)
    chunks = rendered.model_input.chunks
    kinds = [type(c) for c in chunks]
    assert kinds == [EncodedTextChunk, ImageChunk, EncodedTextChunk]
    image = chunks[1]
    assert isinstance(image, ImageChunk)
    assert image.format == "jpeg" and image.data == msgs[0].parts[1].data
    assert image.expected_tokens == renderer.image_preprocessor.num_tokens(64, 128) == 8
    # <|vision_start|> / <|vision_end|> stay in the text chunks around the pad run.
    assert chunks[0].tokens[-1] == 151652 and chunks[2].tokens[0] == 151653


def test_image_cap_drops_and_counts(renderer: Renderer) -> None:
    msgs = [
        Message("user", [_img(64, 64), TextPart("a"), _img(128, 64), _img(64, 128)]),
        Message("assistant", [TextPart("b"), _img()]),  # the template ignores it
    ]
    rendered = renderer.render(msgs)
    images = rendered.model_input.images
    assert len(images) == 1 and images[0].expected_tokens == 4  # the first one is kept
    assert rendered.images_dropped == 3
    uncapped = Renderer(renderer.tokenizer, renderer.image_preprocessor, None).render(msgs)
    assert len(uncapped.model_input.images) == 3 and uncapped.images_dropped == 1


def test_render_prompt(renderer: Renderer) -> None:
    prompt, answer = split_prompt_and_answer(_conv())
    assert answer == "9" and prompt[-1].role == "user"
    rendered = renderer.render_prompt(prompt)
    ids = rendered.model_input.to_ints(renderer.image_token_id)
    assert renderer.tokenizer.decode(ids[-3:]) == "<|im_start|>assistant\n"
    assert not any(rendered.weights)
    with pytest.raises(ValueError, match="split_prompt_and_answer"):
        renderer.render_prompt(_conv())
    assert split_prompt_and_answer(prompt) == (prompt, "")


def test_datum_shift(renderer: Renderer) -> None:
    rendered = renderer.render(_conv())
    ids = rendered.model_input.to_ints(renderer.image_token_id)
    datum = datum_from_rendered(rendered, renderer.image_token_id)
    assert datum.model_input.length == len(ids) - 1
    assert datum.model_input.to_ints(renderer.image_token_id) == ids[:-1]
    targets = datum.loss_fn_inputs["target_tokens"]
    weights = datum.loss_fn_inputs["weights"]
    assert targets.dtype == "int64" and weights.dtype == "float32"
    assert targets.tolist() == ids[1:]
    assert weights.tolist() == rendered.weights[1:]
    assert targets.shape == weights.shape == [len(ids) - 1]
    # The image chunk is carried over intact.
    assert datum.model_input.images == rendered.model_input.images


def test_stop_tokens_and_decode(renderer: Renderer) -> None:
    assert renderer.stop_token_ids == [151645, 151643]
    ids = renderer.tokenizer("<|im_start|>assistant\n7<|im_end|>")["input_ids"]
    assert renderer.decode(ids) == "assistant\n7"


def test_build_sft_datums_reports_drops(renderer: Renderer) -> None:
    short = _conv()
    long = _conv(answer2="nine " * 200)
    no_weight = [Message("user", [TextPart("hi")]), Message("assistant", [TextPart("x")], 0.0)]
    capped = [
        Message("user", [_img(), _img(), TextPart("two images")]),
        Message("assistant", [TextPart("1")]),
    ]
    too_wide = [Message("user", [_img(4000, 10)]), Message("assistant", [TextPart("1")])]
    rows = [
        SFTRow(line=1, messages=short),
        SFTRow(line=2, messages=long),
        SFTRow(line=3, messages=no_weight),
        SFTRow(line=4, messages=capped),
        SFTRow(line=5, messages=too_wide),
    ]
    sequence_length = renderer.render(short).length - 1  # the short one fits exactly
    datums, report = build_sft_datums(rows, renderer, sequence_length=sequence_length)
    assert report.total == 5 and report.kept == len(datums) == 2
    assert [line for line, _ in report.dropped_too_long] == [2]
    assert report.dropped_too_long[0][1] > sequence_length
    assert report.dropped_no_weight == [3]
    assert [line for line, _ in report.dropped_invalid] == [5]
    assert report.images_dropped == 1 and report.images_dropped_lines == [4]
    assert report.dropped == 3 and "2/5 examples kept" in report.summary()
    assert report.to_dict()["dropped_too_long"][0]["line"] == 2
    assert all(d.model_input.length <= sequence_length for d in datums)

    _, tight = build_sft_datums(rows[:1], renderer, sequence_length=sequence_length - 1)
    assert tight.kept == 0 and [line for line, _ in tight.dropped_too_long] == [1]


def test_image_format() -> None:
    assert image_format("image/png") == "png"
    assert image_format("image/jpeg") == "jpeg"
    assert image_format("image/jpg") == "jpeg"
    assert image_format("image/webp") == "webp"
    assert image_format("image/gif") == "gif"


def test_control_tokens_in_message_text_drop_the_row_with_a_reason(renderer):
    from tests.conftest import assistant, image_part, user
    from vlmtune.data.schema import SFTRow
    from vlmtune.render_rows import build_sft_datums

    rows = [
        SFTRow(1, [user("look <|image_pad|> here"), assistant("ok")]),
        SFTRow(2, [user(image_part(), "fake"), assistant("a <|im_end|> b")]),
        SFTRow(3, [user("fine"), assistant("fine")]),
    ]
    datums, report = build_sft_datums(rows, renderer, sequence_length=256)
    assert len(datums) == 1
    reasons = dict(report.dropped_invalid)
    assert "control token <|image_pad|>" in reasons[1]
    assert "messages[1] (assistant)" in reasons[2]


def test_render_refusals_are_row_errors_with_a_category(renderer):
    from tests.conftest import assistant, image_part, user
    from vlmtune.data.errors import RowError

    with pytest.raises(RowError) as wide:
        renderer.render([user(image_part(4000, 10), "wide"), assistant("1")])
    assert wide.value.category == "image the processor refuses"
    assert str(wide.value).startswith("messages[0]: image") and "aspect ratio" in str(wide.value)
    with pytest.raises(RowError) as control:
        renderer.render_prompt([user("a <|vision_end|> b")])
    assert control.value.category == "text contains a chat control token"
